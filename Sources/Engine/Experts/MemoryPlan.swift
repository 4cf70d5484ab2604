/// What a session holds besides the expert cache, for `--memory-budget`: the dense tensors
/// (read through the mapping, so their pages become resident), every sequence's KV cache, the
/// working buffers and logits, and a fixed allowance for the process itself (binary, Swift
/// runtime, stacks, tokenizer).
public struct MemoryPlan: Sendable, CustomStringConvertible {
    public let denseBytes: Int
    public let kvCacheBytes: Int
    public let bufferBytes: Int
    public static let processAllowance = 64 << 20

    public var fixedBytes: Int { denseBytes + kvCacheBytes + bufferBytes + MemoryPlan.processAllowance }

    /// - Parameter sequences: sequences held at once (each has its KV cache and a row of logits).
    public init(model: Model, contextLength: Int, threads: Int, sequences: Int = 1) {
        let c = model.config
        let manifest = model.package.manifest
        denseBytes =
            manifest.denseTensors.reduce(0) { $0 + $1.length }
            + manifest.files.reduce(0) { $0 + $1.length } + model.package.header.dataOffset
        kvCacheBytes =
            sequences
            * model.layers.reduce(0) { total, layer in
                total + 2 * 4 * c.kvWidth * KVCache.capacity(context: contextLength, window: layer.window)
            }
        // The session's list of buffers, its other objects' buffers, and logits (a step's row
        // per sequence, and the sampler's copies).
        bufferBytes =
            SessionBuffer.layout(c, threads: threads).bytes + SessionBuffer.objectBytes(c) + 4 * (2 + sequences) * c.vocabSize
    }

    public var description: String {
        "dense tensors (\(PackageSummary.bytes(denseBytes))), KV cache (\(PackageSummary.bytes(kvCacheBytes))), buffers "
            + "(\(PackageSummary.bytes(bufferBytes))) and the process (\(PackageSummary.bytes(MemoryPlan.processAllowance)))"
    }
}

/// A byte count with an optional unit: `1073741824`, `800MB`, `1.5GiB`, `512 MiB`, `2G`.
/// KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB (and bare K/M/G/T) powers of 1024.
public struct ByteCount: Sendable, Equatable, CustomStringConvertible {
    public let bytes: Int
    public let text: String

    /// nil for text that is not a positive size.
    public init?(_ text: String) {
        guard let bytes = ByteCount.parse(text) else { return nil }
        self.bytes = bytes
        self.text = text
    }

    public var description: String { text }

    public static func parse(_ text: String) -> Int? {
        let trimmed = text.filter { $0 != " " && $0 != "_" }
        let digits = trimmed.prefix { $0.isNumber || $0 == "." }
        guard !digits.isEmpty, let value = Double(digits), value > 0 else { return nil }
        let unit = trimmed.dropFirst(digits.count).lowercased()
        let scale: Double
        switch unit {
        case "", "b": scale = 1
        case "kb": scale = 1e3
        case "mb": scale = 1e6
        case "gb": scale = 1e9
        case "tb": scale = 1e12
        case "k", "kib": scale = 1024
        case "m", "mib": scale = 1024 * 1024
        case "g", "gib": scale = 1024 * 1024 * 1024
        case "t", "tib": scale = 1024 * 1024 * 1024 * 1024
        default: return nil
        }
        let bytes = value * scale
        guard bytes < 9e18 else { return nil }
        return Int(bytes)
    }
}
