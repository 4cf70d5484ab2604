import CKernels
import Format
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Choosing the kernel tier. A session computes with one tier throughout: the one it was given,
/// else `configured()` (the environment's `STRUN_KERNELS`, else the best this CPU has). The tier
/// is bound to the threads that compute for the session while they do, so sessions on different
/// tiers can run side by side in one process.
extension DotKernels.InstructionSet {
    /// The name `STRUN_KERNELS` takes and reports print.
    public var name: String {
        switch self {
        case .portable: "portable"
        case .avx2: "avx2"
        case .avx512: "avx512"
        case .neon: "neon"
        case .neonDotProd: "neon-dotprod"
        }
    }

    /// What a CPU needs for this tier.
    public var requirement: String {
        switch self {
        case .portable: "nothing beyond C"
        case .avx2: "AVX2, FMA and F16C"
        case .avx512: "AVX-512 F, BW and VL with VNNI"
        case .neon: "an aarch64 CPU (NEON)"
        case .neonDotProd: "an aarch64 CPU with the dot-product extension (SDOT)"
        }
    }

    public init?(name: String) {
        guard let tier = Self.allCases.first(where: { $0.name == name.lowercased() }) else { return nil }
        self = tier
    }

    /// Whether this CPU (and build) can run the tier.
    public var isSupported: Bool { st_kernels_for(rawValue) != nil }

    /// Every tier this CPU can run, portable first.
    public static var supported: [Self] { allCases.filter(\.isSupported) }
}

extension DotKernels {
    /// The environment variable that forces a tier: portable, avx2 or avx512 on x86, portable,
    /// neon or neon-dotprod on aarch64.
    public static let environmentVariable = "STRUN_KERNELS"

    /// The tier sessions use unless given one: `STRUN_KERNELS` when set, else the best this CPU
    /// has. It also becomes the process-wide selection, for kernel calls outside a session.
    /// Throws when the variable names no tier or one this CPU lacks.
    public static func configured() throws(EngineError) -> InstructionSet {
        try environmentChoice.get()
    }

    /// Whether `STRUN_KERNELS` chose the configured tier (rather than detection).
    public static var forcedByEnvironment: Bool { requestedName != nil }

    private static let requestedName: String? = getenv(environmentVariable).map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 }

    private static let environmentChoice: Result<InstructionSet, EngineError> = {
        let choice = Result { () throws(EngineError) in try resolve(requestedName) }
        if case .success(let tier) = choice { st_kernels_select(tier.rawValue) }
        return choice
    }()

    /// The tier a `STRUN_KERNELS` value asks for (nil: the best this CPU has), checked against
    /// the CPU.
    public static func resolve(_ request: String?) throws(EngineError) -> InstructionSet {
        guard let request else { return detected }
        let names = InstructionSet.allCases.map(\.name).joined(separator: ", ")
        guard let tier = InstructionSet(name: request) else {
            throw .kernelTier(
                "\(environmentVariable)=\(request) names no kernel tier; use one of \(names), or unset it for the best this CPU has "
                    + "(\(detected.name))"
            )
        }
        try require(tier, source: "\(environmentVariable)=\(request)")
        return tier
    }

    /// Throws unless this CPU can run `tier`; `source` says who asked for it.
    static func require(_ tier: InstructionSet, source: String) throws(EngineError) {
        guard tier.isSupported else {
            let cpu = cpuModel.map { " (\($0))" } ?? ""
            throw .kernelTier(
                "\(source) asks for the \(tier.name) kernels, which need \(tier.requirement); this CPU\(cpu) has "
                    + "\(InstructionSet.supported.map(\.name).joined(separator: ", "))"
            )
        }
    }

    /// The CPU's model name, where the system says it (Linux: /proc/cpuinfo).
    public static let cpuModel: String? = {
        #if os(Linux)
        guard let file = fopen("/proc/cpuinfo", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 512)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard text.hasPrefix("model name"), let colon = text.firstIndex(of: ":") else { continue }
            return text[text.index(after: colon)...].trimmingCharacters(in: " \t\n")
        }
        #endif
        return nil
    }()

    /// One line for reports: the tier in use and why, the CPU and what it supports.
    public static func describe(_ tier: InstructionSet) -> String {
        let why = forcedByEnvironment ? "forced by \(environmentVariable)" : tier == detected ? "the best this CPU has" : "chosen"
        return
            "\(tier.name) (\(why); this CPU\(cpuModel.map { ", \($0)," } ?? "") has "
            + "\(InstructionSet.supported.map(\.name).joined(separator: ", ")))"
    }

    /// `describe(configured())`, or why there is no configured tier.
    public static var configurationReport: String {
        switch environmentChoice {
        case .success(let tier): describe(tier)
        case .failure(let error): "none: \(error)"
        }
    }

    /// Runs `body` with the calling thread's kernel calls on `tier`, then restores its binding.
    static func with<R, E: Error>(_ tier: InstructionSet, _ body: () throws(E) -> R) throws(E) -> R {
        let previous = st_kernels_bind(tier.rawValue)
        defer { st_kernels_bind(previous) }
        return try body()
    }
}

/// `parallelFor` whose workers compute with the calling thread's kernel tier (sessions bind
/// theirs on the calling thread; the shared workers take it for the length of each body).
func parallelForOnThisTier(_ count: Int, _ body: (Int) -> Void) {
    let tier = st_kernels_bound()
    parallelFor(count) { i in
        let previous = st_kernels_bind(tier)
        body(i)
        st_kernels_bind(previous)
    }
}

extension Substring {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = self[...]
        while let f = s.first, set.contains(f) { s = s.dropFirst() }
        while let l = s.last, set.contains(l) { s = s.dropLast() }
        return String(s)
    }
}
