import Format

/// Errors of the runtime. Each message says what to do about it.
public enum EngineError: ReportableError, Equatable {
    /// The session's context is full.
    case contextFull(limit: Int)
    /// A token id outside the vocabulary.
    case invalidToken(id: Int, vocabularySize: Int)
    /// Nothing to evaluate.
    case emptyInput
    /// A context length the model cannot take.
    case contextLength(requested: Int, maximum: Int)
    /// An input longer than the session's context.
    case inputTooLong(tokens: Int, context: Int)
    /// A memory budget that cannot hold what a session needs before any expert (`needed` bytes,
    /// `parts` says of what).
    case budgetBelowDensePart(budget: Int, needed: Int, parts: String)
    /// More sequences than a memory budget holds (`fits`: the largest count that fits; nil when
    /// the count itself is not positive).
    case sequenceCount(requested: Int, fits: Int?, budget: Int?)
    /// A step that names one sequence twice.
    case duplicateSequence(Int)
    /// A sequence index the session does not have.
    case invalidSequence(Int, count: Int)
    /// A step of more tokens than a forward batch holds.
    case batchTooLarge(tokens: Int, maximum: Int)
    /// A generation refused because every sequence is busy and the waiting queue is full.
    case queueFull(waiting: Int)
    /// The generator was shut down before the generation finished.
    case shutDown
    /// A memory budget whose expert cache has fewer slots than one layer's chosen experts.
    case budgetBelowOneLayer(slots: Int, slotBytes: Int, needed: Int)
    /// Every expert cache slot is held by the layer being computed.
    case cacheExhausted
    /// An allocation the operating system refused.
    case outOfMemory(bytes: Int, purpose: String)
    /// The model produced a token the tokenizer cannot decode.
    case undecodableToken(id: Int, detail: String)
    /// Two packages that should share a vocabulary do not.
    case vocabularyMismatch(Int, Int)
    /// Reading weights from the package failed.
    case io(path: String, detail: String)
    /// The kernel tier asked for is unknown or beyond this CPU.
    case kernelTier(String)
    /// The KV cache type cannot hold this model's heads (q8_0 needs head_dim a multiple of 32).
    case kvCacheType(KVCacheType, headDim: Int)

    public var description: String {
        switch self {
        case .contextFull(let limit):
            return "the context is full (\(limit) tokens); start over, or raise --context (up to the model's max_position_embeddings)"
        case .invalidToken(let id, let size):
            return "token id \(id) is outside the vocabulary (0..<\(size))"
        case .emptyInput:
            return "no tokens to evaluate"
        case .contextLength(let requested, let maximum):
            return "context length \(requested) is outside 1...\(maximum) (the model's max_position_embeddings)"
        case .inputTooLong(let tokens, let context):
            return "\(tokens) tokens do not fit the context of \(context); give a shorter text or a larger --context"
        case .budgetBelowDensePart(let budget, let needed, let parts):
            return
                "a memory budget of \(PackageSummary.bytes(budget)) cannot hold the dense part: \(parts) need "
                + "\(PackageSummary.bytes(needed)) before any expert"
        case .sequenceCount(let requested, let fits, let budget):
            guard let fits, let budget else { return "the number of sequences must be at least 1 (got \(requested))" }
            if fits == 0 {
                return
                    "a memory budget of \(PackageSummary.bytes(budget)) cannot hold even one sequence at this context; raise "
                    + "--memory-budget or lower --context"
            }
            return
                "\(requested) sequences do not fit a memory budget of \(PackageSummary.bytes(budget)) at this context: at most "
                + "\(fits) do (each needs its own KV cache; lower --context, or raise --memory-budget)"
        case .duplicateSequence(let sequence):
            return "a step names sequence \(sequence) twice; give each sequence's tokens as one chunk"
        case .invalidSequence(let sequence, let count):
            return "sequence \(sequence) is outside the session's 0..<\(count)"
        case .batchTooLarge(let tokens, let maximum):
            return "a step of \(tokens) tokens is more than a forward batch's \(maximum); split it over several steps"
        case .queueFull(let waiting):
            return "every sequence is busy and \(waiting) requests are already waiting; try again later"
        case .shutDown:
            return "the generator was shut down"
        case .budgetBelowOneLayer(let slots, let slotBytes, let needed):
            return
                "the memory budget leaves room for \(slots) expert bundles of \(PackageSummary.bytes(slotBytes)); one layer needs "
                + "\(needed) (raise --memory-budget)"
        case .cacheExhausted:
            return "every expert cache slot is in use by the current layer; raise --memory-budget"
        case .outOfMemory(let bytes, let purpose):
            return "cannot allocate \(PackageSummary.bytes(bytes)) for \(purpose)"
        case .undecodableToken(let id, let detail):
            return "the model produced token \(id), which the tokenizer does not have: \(detail)"
        case .vocabularyMismatch(let a, let b):
            return "the packages have different vocabularies (\(a) and \(b)); compare packages of the same model"
        case .io(let path, let detail):
            return "\(path): \(detail)"
        case .kernelTier(let detail):
            return detail
        case .kvCacheType(let type, let headDim):
            return
                "a \(type.rawValue) KV cache cannot hold this model's heads of \(headDim) values (q8_0 stores blocks of 32); use "
                + "--kv-type f16 or f32"
        }
    }
}

struct LayerWeights: @unchecked Sendable {
    let attentionNorm: [Float]  // (hidden)
    let query: WeightMatrix  // (heads·head_dim, hidden)
    let key: WeightMatrix  // (kv_heads·head_dim, hidden)
    let value: WeightMatrix  // (kv_heads·head_dim, hidden)
    let output: WeightMatrix  // (hidden, heads·head_dim)
    let ffnNorm: [Float]  // (hidden)
    let router: WeightMatrix  // (experts, hidden)
    let experts: [ExpertWeights]
    let rope: Bool
    /// Keys visible to a query, itself included; nil for global layers.
    let window: Int?
}

/// A SmallThinker model executing from a memory-mapped .stpk package: weight matrices are views
/// into the mapping, norms aside. Q4_0 matrices that `stquant` stored `row_major_x8` go straight
/// to the eight-row kernels. With `copyHotMatrices` (the default) the matrices read whole for
/// every token (attention, routers, output head) are copied to huge pages, plain Q4_0 rows
/// (format 1, or `stquant --plain-rows`) arranged in `row_major_x8` on the way (their mapped
/// pages are then released, so this costs load time, not memory); with `arrangeExperts` too, the
/// plain-row experts' gate and up (about 1.4 GB of anonymous memory on the 4B, so not when
/// streaming experts).
public final class Model: @unchecked Sendable {
    public let package: PackageReader
    public let config: ModelConfig
    let embedding: WeightMatrix  // (vocab, hidden)
    let layers: [LayerWeights]
    let outputNorm: [Float]  // (hidden)
    let output: WeightMatrix  // (vocab, hidden); the embedding when tied
    /// Every expert as views into the mapping (what the expert cache reads and moves into its
    /// slots), whether or not `layers` holds arranged copies of gate and up.
    let mappedExperts: [[ExpertWeights]]
    /// Owns the copied matrices.
    private let storage: WeightStorage?
    /// How many Q4_0 matrices were stored in plain rows and arranged in row groups at load (0 for
    /// packages that store `row_major_x8`, stquant's default): worth telling the user, since
    /// re-running stquant stores them grouped and makes loading a memory map again.
    public let matricesArrangedAtLoad: Int

    public convenience init(path: String, copyHotMatrices: Bool = true, arrangeExperts: Bool = true) throws(FormatError) {
        try self.init(package: try PackageReader(path: path), copyHotMatrices: copyHotMatrices, arrangeExperts: arrangeExperts)
    }

    /// `copyHotMatrices: false` keeps every matrix in place in the mapping (for comparisons).
    public init(package: PackageReader, copyHotMatrices: Bool = true, arrangeExperts: Bool = true) throws(FormatError) {
        self.package = package
        let c = package.manifest.config
        config = c
        func mapped(_ name: String) -> WeightMatrix {
            // The reader has checked presence, shape and range of every tensor the config needs.
            let t = package.tensor(name)!
            return WeightMatrix(
                name: name, base: package.bytes(of: t).baseAddress!, dtype: t.dtype, rows: t.shape[0], columns: t.shape[1],
                layout: t.layout)
        }
        func vector(_ name: String) -> [Float] {
            let t = package.tensor(name)!
            var out = [Float](repeating: 0, count: t.elementCount)
            out.withUnsafeMutableBufferPointer {
                TensorCodec.decode(package.bytes(of: t).baseAddress!, dtype: t.dtype, count: t.elementCount, into: $0.baseAddress!)
            }
            return out
        }
        let experts = (0..<c.layerCount).map { n in
            (0..<c.expertCount).map { e in
                ExpertWeights(
                    gate: mapped(TensorNames.expertGate(n, e)), up: mapped(TensorNames.expertUp(n, e)),
                    down: mapped(TensorNames.expertDown(n, e)))
            }
        }
        mappedExperts = experts
        // What is read whole for every token (and, when asked and possible, the experts' gate and
        // up) is copied; the routers (f32) as they are, so that nothing read every token stays in
        // the mapping.
        var hot = [c.tieWordEmbeddings ? TensorNames.embedding : TensorNames.output]
        for n in 0..<c.layerCount {
            hot += [TensorNames.query(n), TensorNames.key(n), TensorNames.value(n), TensorNames.attentionOutput(n), TensorNames.router(n)]
        }
        let arrangeExperts =
            arrangeExperts && experts.allSatisfy { $0.allSatisfy { $0.gate.canArrangeInRowGroups && $0.up.canArrangeInRowGroups } }
        if arrangeExperts { hot += experts.joined().flatMap { [$0.gate.name, $0.up.name] } }
        if copyHotMatrices {
            // The hot matrices are about to be copied to huge pages of their own; what stays in the
            // mapping (norms, an untied embedding) is read a little at a time, and with 2 MiB
            // mappings each touch would bring back a released copy's neighbours.
            let bytes = package.mapping.bytes
            let end = package.manifest.bundles.first?.offset ?? bytes.count
            package.mapping.adviseSmallPages(UnsafeRawBufferPointer(rebasing: bytes[package.header.dataOffset..<end]))
        }
        let routers = Set((0..<c.layerCount).map(TensorNames.router))
        let copied = copyHotMatrices ? Model.copy(hot.map(mapped), keepingLayout: routers, mapping: package.mapping) : nil
        storage = copied?.storage
        matricesArrangedAtLoad = copied == nil ? 0 : hot.map(mapped).filter(\.canArrangeInRowGroups).count
        func matrix(_ name: String) -> WeightMatrix { copied?.matrices[name] ?? mapped(name) }
        output = matrix(c.tieWordEmbeddings ? TensorNames.embedding : TensorNames.output)
        embedding = c.tieWordEmbeddings ? output : mapped(TensorNames.embedding)
        outputNorm = vector(TensorNames.outputNorm)
        layers = (0..<c.layerCount).map { n in
            LayerWeights(
                attentionNorm: vector(TensorNames.attentionNorm(n)),
                query: matrix(TensorNames.query(n)), key: matrix(TensorNames.key(n)),
                value: matrix(TensorNames.value(n)), output: matrix(TensorNames.attentionOutput(n)),
                ffnNorm: vector(TensorNames.ffnNorm(n)), router: matrix(TensorNames.router(n)),
                experts: experts[n].map { e in ExpertWeights(gate: matrix(e.gate.name), up: matrix(e.up.name), down: e.down) },
                rope: c.ropeLayout[n],
                window: c.slidingWindowLayout[n] ? c.slidingWindowSize : nil)
        }
    }

    /// Copies the Q4_0 matrices (arranging plain rows in row groups, copying `.rowMajorX8` ones as
    /// they are) and those named in `keepingLayout` (unchanged: the f32 routers) into one
    /// anonymous allocation on transparent huge pages, in parallel and in chunks, releasing their
    /// mapped pages as it goes; returns the copies by name. nil when there is nothing to copy or
    /// no memory for it. The dense matrices are copied even when stored
    /// in row groups: read whole for every token, they stream measurably faster from huge pages
    /// (prompt processing ~10-15% on the 4B here) than from the page cache's 4 KiB pages.
    private static func copy(
        _ matrices: [WeightMatrix], keepingLayout asIs: Set<String>, mapping: MappedFile
    )
        -> (storage: WeightStorage, matrices: [String: WeightMatrix])?
    {
        var offsets: [Int?] = []
        var total = 0
        for m in matrices {
            if m.canArrangeInRowGroups || m.layout == .rowMajorX8 || asIs.contains(m.name) {
                offsets.append(total)
                total += (m.rows * m.rowBytes + 4095) / 4096 * 4096
            } else {
                offsets.append(nil)
            }
        }
        guard total > 0, let storage = WeightStorage(bytes: total) else { return nil }
        // Chunks of at most 4096 rows, so the output head spreads over every core.
        var jobs: [(source: UnsafeRawPointer, target: UnsafeMutableRawPointer, rowBytes: Int, rows: Int, arrange: Bool)] = []
        for (m, offset) in zip(matrices, offsets) {
            guard let offset else { continue }
            var first = 0
            while first < m.rows {
                let rows = min(4096, m.rows - first)
                jobs.append(
                    (
                        m.base + first * m.rowBytes, storage.base + offset + first * m.rowBytes, m.rowBytes, rows,
                        m.layout == .rowMajor && !asIs.contains(m.name)
                    ))
                first += rows
            }
        }
        // Each chunk's mapped pages are released as soon as it is copied, so the peak resident
        // set stays near the final one.
        let shared = Unchecked((jobs, mapping))
        parallelFor(WorkerPool.shared.workers + 1) { slice in
            let (jobs, mapping) = shared.value
            for j in stride(from: slice, to: jobs.count, by: WorkerPool.shared.workers + 1) {
                let job = jobs[j]
                if job.arrange {
                    RowMajorX8.arrange(job.source, into: job.target, rowBytes: job.rowBytes, rowCount: job.rows)
                } else {
                    job.target.copyMemory(from: job.source, byteCount: job.rows * job.rowBytes)
                }
                mapping.release(UnsafeRawBufferPointer(start: job.source, count: job.rows * job.rowBytes))
            }
        }
        var result: [String: WeightMatrix] = [:]
        for (m, offset) in zip(matrices, offsets) {
            guard let offset else { continue }
            result[m.name] = WeightMatrix(
                name: m.name, base: storage.base + offset, dtype: m.dtype, rows: m.rows, columns: m.columns,
                layout: asIs.contains(m.name) ? m.layout : .rowMajorX8)
        }
        return (storage, result)
    }

    /// Bytes of the matrices a forward step reads whole, whatever its tokens: attention, routers
    /// and the output head (the embedding is read a row per token).
    public var denseBytesPerStep: Int {
        let perLayer = layers.reduce(0) { total, l in
            total + [l.query, l.key, l.value, l.output, l.router].reduce(0) { $0 + $1.rows * $1.rowBytes }
        }
        return perLayer + output.rows * output.rowBytes
    }

    /// The mean size of an expert's bundle (gate, up and down): what a step reads for each expert
    /// its tokens chose, at most (idle ReGLU neurons' up and down rows are skipped).
    public var meanExpertBytes: Int {
        let bundles = package.manifest.bundles
        return bundles.isEmpty ? 0 : bundles.reduce(0) { $0 + $1.length } / bundles.count
    }

    /// The default context: the model's limit, capped so a KV cache fits comfortably in memory.
    public var defaultContextLength: Int { min(config.maxPositionEmbeddings, 4096) }
}
