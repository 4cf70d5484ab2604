/// Errors of the runtime. Each message says what to do about it.
public enum EngineError: Error, Equatable, CustomStringConvertible {
    /// The session's context is full.
    case contextFull(limit: Int)
    /// A token id outside the vocabulary.
    case invalidToken(id: Int, vocabularySize: Int)
    /// A request the model cannot serve (bad context size, empty input, ...).
    case invalidRequest(String)
    /// Reading weights from the package failed.
    case io(path: String, detail: String)

    public var description: String {
        switch self {
        case .contextFull(let limit):
            return "the context is full (\(limit) tokens); start over, or raise --context (up to the model's max_position_embeddings)"
        case .invalidToken(let id, let size):
            return "token id \(id) is outside the vocabulary (0..<\(size))"
        case .invalidRequest(let detail):
            return detail
        case .io(let path, let detail):
            return "\(path): \(detail)"
        }
    }
}

/// One expert's matrices, all neuron-major [ffn, hidden]: row j of each belongs to neuron j.
struct ExpertWeights: @unchecked Sendable {
    let gate: WeightMatrix
    let up: WeightMatrix
    let down: WeightMatrix
}

struct LayerWeights: @unchecked Sendable {
    let attentionNorm: [Float]   // (hidden)
    let query: WeightMatrix      // (heads·head_dim, hidden)
    let key: WeightMatrix        // (kv_heads·head_dim, hidden)
    let value: WeightMatrix      // (kv_heads·head_dim, hidden)
    let output: WeightMatrix     // (hidden, heads·head_dim)
    let ffnNorm: [Float]         // (hidden)
    let router: WeightMatrix     // (experts, hidden)
    let experts: [ExpertWeights]
    let rope: Bool
    /// Keys visible to a query, itself included; nil for global layers.
    let window: Int?
}

/// A SmallThinker model executing straight from a memory-mapped .stpk package: weight matrices
/// are views into the mapping (nothing is copied or dequantised at load); only the norm vectors,
/// a few KB, are decoded to float32.
public final class Model: @unchecked Sendable {
    public let package: PackageReader
    public let config: ModelConfig
    let embedding: WeightMatrix      // (vocab, hidden)
    let layers: [LayerWeights]
    let outputNorm: [Float]          // (hidden)
    let output: WeightMatrix         // (vocab, hidden); the embedding when tied

    public convenience init(path: String) throws(FormatError) {
        try self.init(package: try PackageReader(path: path))
    }

    public init(package: PackageReader) throws(FormatError) {
        self.package = package
        let c = package.manifest.config
        config = c
        func matrix(_ name: String) -> WeightMatrix {
            // The reader has checked presence, shape and range of every tensor the config needs.
            let t = package.tensor(name)!
            return WeightMatrix(name: name, base: package.bytes(of: t).baseAddress!, dtype: t.dtype, rows: t.shape[0], columns: t.shape[1])
        }
        func vector(_ name: String) -> [Float] {
            let t = package.tensor(name)!
            var out = [Float](repeating: 0, count: t.elementCount)
            out.withUnsafeMutableBufferPointer { TensorCodec.decode(package.bytes(of: t).baseAddress!, dtype: t.dtype, count: t.elementCount, into: $0.baseAddress!) }
            return out
        }
        embedding = matrix(TensorNames.embedding)
        output = c.tieWordEmbeddings ? embedding : matrix(TensorNames.output)
        outputNorm = vector(TensorNames.outputNorm)
        layers = (0..<c.layerCount).map { n in
            LayerWeights(
                attentionNorm: vector(TensorNames.attentionNorm(n)),
                query: matrix(TensorNames.query(n)), key: matrix(TensorNames.key(n)),
                value: matrix(TensorNames.value(n)), output: matrix(TensorNames.attentionOutput(n)),
                ffnNorm: vector(TensorNames.ffnNorm(n)), router: matrix(TensorNames.router(n)),
                experts: (0..<c.expertCount).map { e in
                    ExpertWeights(gate: matrix(TensorNames.expertGate(n, e)), up: matrix(TensorNames.expertUp(n, e)),
                                  down: matrix(TensorNames.expertDown(n, e)))
                },
                rope: c.ropeLayout[n],
                window: c.slidingWindowLayout[n] ? c.slidingWindowSize : nil)
        }
    }

    /// The default context: the model's limit, capped so a KV cache fits comfortably in memory.
    public var defaultContextLength: Int { min(config.maxPositionEmbeddings, 4096) }
}
