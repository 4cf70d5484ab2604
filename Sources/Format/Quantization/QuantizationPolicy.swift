/// Which dtype each tensor gets when a package is quantised.
///
/// Defaults (as the SmallThinker authors ship Q4_0): every 2-D weight whose rows split into blocks
/// of 32 becomes `type`, embeddings and output head included; norms and routers stay f32 (they
/// are tiny and routing is sensitive); a matrix whose rows cannot be split into blocks falls back
/// to f16. Overrides, in the style of llama-quantize: `--tensor-type PATTERN=TYPE` (first match
/// wins, `*` matches any run of characters), `--embedding-type`, `--output-type`.
///
/// Q4_0 matrices stored in their source orientation are written `row_major_x8` (rows in groups
/// of eight for the runtime's eight-row kernels; the blocks are ggml's, byte for byte) unless
/// `groupedLayouts` is off. Expert `up` matrices are written `row_major_b8` instead (each row's blocks
/// grouped in eights; rows of a multiple of 256 values), because the runtime reads the up row of
/// an active neuron only; neuron-major
/// `down` matrices keep plain rows for the same reason.
public struct QuantizationPolicy: Sendable {
    public var type: TensorDType
    public var embeddingType: TensorDType?
    public var outputType: TensorDType?
    public var overrides: [(pattern: String, type: TensorDType)]
    public var allowRequantize: Bool
    public var groupedLayouts: Bool
    /// Q4_0 blocks chosen by error weighted by this importance matrix (`--imatrix`), as
    /// `llama-quantize --imatrix` chooses them.
    public var importance: ImportanceMatrix?
    /// A Q4_0 token embedding's blocks chosen with error feedback that keeps its rounding error
    /// out of the directions the routers read (`--router-aware`; `Quantizer.routerCompensation`).
    public var routerAware = false

    public init(
        type: TensorDType, embeddingType: TensorDType? = nil, outputType: TensorDType? = nil,
        overrides: [(pattern: String, type: TensorDType)] = [], allowRequantize: Bool = false, groupedLayouts: Bool = true
    ) {
        self.groupedLayouts = groupedLayouts
        self.type = type
        self.embeddingType = embeddingType
        self.outputType = outputType
        self.overrides = overrides
        self.allowRequantize = allowRequantize
    }

    /// The stored layout for tensor `name` of `shape`, in `orientation` relative to its source,
    /// given the dtype it gets.
    public func layout(name: String, dtype: TensorDType, shape: [Int], orientation: TensorLayout) -> TensorLayout {
        guard groupedLayouts, orientation == .rowMajor, shape.count == 2, let rowBytes = dtype.byteLength(shape: [shape[1]]) else {
            return orientation
        }
        let upRows = name.hasSuffix(".up") && TensorNames.role(of: name) == .expert
        for layout in upRows ? [TensorLayout.rowMajorB8, .rowMajorX8] : [.rowMajorX8]
        where layout.fits(dtype: dtype, rows: shape[0], rowBytes: rowBytes) {
            return layout
        }
        return orientation
    }

    /// Parses `PATTERN=TYPE`.
    public static func parseOverride(_ text: String) throws(FormatError) -> (pattern: String, type: TensorDType) {
        let parts = text.split(separator: "=", maxSplits: 1).map(String.init)
        guard parts.count == 2, !parts[0].isEmpty, let type = TensorDType(rawValue: parts[1].lowercased()) else {
            throw .invalidRequest(
                "--tensor-type takes PATTERN=TYPE with TYPE one of \(TensorDType.allCases.map(\.rawValue).joined(separator: ", ")) (got "
                    + "'\(text)')"
            )
        }
        return (parts[0], type)
    }

    public struct Decision: Sendable, Equatable {
        public var dtype: TensorDType
        /// Why, for the dry run: "default", "norm/router", "override layers.*.attn_v=q8_0", ...
        public var reason: String
        /// True when the requested quantised type could not be used (rows not a multiple of 32).
        public var fellBack: Bool
    }

    public func decide(_ tensor: TensorEntry) -> Decision {
        let role = TensorNames.role(of: tensor.name)
        var wanted: TensorDType
        var reason: String
        if let match = overrides.first(where: { QuantizationPolicy.glob($0.pattern, matches: tensor.name) }) {
            wanted = match.type
            reason = "override \(match.pattern)=\(match.type.rawValue)"
        } else {
            switch role {
            case .norm, .router:
                return Decision(dtype: .f32, reason: "\(role.rawValue): kept in f32", fellBack: false)
            case .embedding:
                wanted = embeddingType ?? type
                reason = embeddingType == nil ? "default" : "--embedding-type"
            case .output:
                wanted = outputType ?? type
                reason = outputType == nil ? "default" : "--output-type"
            case .attention, .expert:
                wanted = type
                reason = "default"
            }
        }
        if wanted.isQuantized && (tensor.shape.count < 2 || tensor.rowLength % wanted.blockSize != 0) {
            return Decision(
                dtype: .f16,
                reason: "rows of \(tensor.rowLength) do not split into blocks of \(wanted.blockSize); f16 instead of \(wanted.rawValue)",
                fellBack: true)
        }
        return Decision(dtype: wanted, reason: reason, fellBack: false)
    }

    /// Shell-style `*` wildcard match over the whole name.
    public static func glob(_ pattern: String, matches name: String) -> Bool {
        let p = Array(pattern.utf8), s = Array(name.utf8)
        var pi = 0, si = 0, star = -1, mark = 0
        while si < s.count {
            if pi < p.count, p[pi] == UInt8(ascii: "*") {
                star = pi; mark = si; pi += 1
            } else if pi < p.count, p[pi] == s[si] {
                pi += 1; si += 1
            } else if star >= 0 {
                pi = star + 1; mark += 1; si = mark
            } else {
                return false
            }
        }
        while pi < p.count, p[pi] == UInt8(ascii: "*") { pi += 1 }
        return pi == p.count
    }
}
