import Format

/// Every working buffer a session holds, with its size: `Session` carves its buffers out of one
/// allocation laid out from this list, and `MemoryPlan` counts the same list, so what the budget
/// reserves is what the session allocates (a test checks the two agree).
enum SessionBuffer: CaseIterable {
    case queries, keys, values, projected, routerLogits, predictedLogits, predictedExperts, mixture, partials, sliceSums
    case gateBuffers, activeIndices, upTokens, downRows, downScales, pairRows, pairCoefficients, ropeAngles, decodePairs

    /// Elements of this buffer for a session of `threads` workers (shapes as on `Session`'s fields).
    func elements(_ c: ModelConfig, threads: Int) -> Int {
        let b = Session.maximumBatch, ffn = c.expertFFNSize, t = max(1, threads)
        switch self {
        case .queries: return b * c.queryWidth
        case .keys, .values: return b * c.kvWidth
        case .projected, .mixture: return b * c.hiddenSize
        case .routerLogits: return b * c.expertCount
        case .predictedLogits: return c.expertCount
        case .predictedExperts: return c.activeExperts
        case .partials: return t * b * c.hiddenSize
        case .sliceSums: return Session.decodeTokens * c.activeExperts * Session.decodeSlices * c.hiddenSize
        case .gateBuffers: return t * Session.gateBufferStride(ffn: ffn)
        case .activeIndices: return t * max(ffn, b)
        case .upTokens: return t * b
        case .downRows, .downScales: return t * b * ffn
        case .pairRows: return t * 2 * ffn
        case .pairCoefficients: return t * 4 * ffn
        case .ropeAngles: return b * c.headDim
        case .decodePairs: return Session.decodeTokens * c.activeExperts
        }
    }

    /// Bytes per element: Float and Int32 4, Int (expert indices) 8, an (expert, token) pair its
    /// struct's stride.
    var elementBytes: Int {
        switch self {
        case .predictedExperts: MemoryLayout<Int>.stride
        case .decodePairs: MemoryLayout<ExpertPair>.stride
        default: 4
        }
    }

    /// Where each buffer starts in one allocation (64-byte aligned), and the allocation's size.
    static func layout(_ c: ModelConfig, threads: Int) -> (offsets: [SessionBuffer: Int], bytes: Int) {
        var offsets: [SessionBuffer: Int] = [:], total = 0
        for buffer in allCases {
            offsets[buffer] = total
            total += (buffer.elements(c, threads: threads) * buffer.elementBytes + 63) / 64 * 64
        }
        return (offsets, total)
    }

    /// What the session's objects beside the list allocate: its activation batches (floats and
    /// Q8_0 forms: the residual stream, the normed input, the attention output, batch rows each,
    /// and a batch's inputs gathered by expert, batch · active rows) and the routing's arrays.
    static func objectBytes(_ c: ModelConfig) -> Int {
        let b = Session.maximumBatch
        return ActivationBatch.bytes(columns: c.hiddenSize, capacity: b) * 2 + ActivationBatch.bytes(columns: c.queryWidth, capacity: b)
            + ActivationBatch.bytes(columns: c.hiddenSize, capacity: b * c.activeExperts)
            + ExpertAssignments.bytes(experts: c.expertCount, active: c.activeExperts, batch: b)
    }
}

/// One allocation holding every `SessionBuffer`.
final class SessionArena {
    let base: UnsafeMutableRawPointer
    let bytes: Int
    private let offsets: [SessionBuffer: Int]

    init(_ c: ModelConfig, threads: Int) {
        (offsets, bytes) = SessionBuffer.layout(c, threads: threads)
        base = .allocate(byteCount: max(bytes, 64), alignment: 64)
    }

    deinit { base.deallocate() }

    func pointer<T>(_ buffer: SessionBuffer, as type: T.Type) -> UnsafeMutablePointer<T> {
        precondition(MemoryLayout<T>.stride == buffer.elementBytes)
        return (base + offsets[buffer]!).bindMemory(to: T.self, capacity: 1)
    }
}
