import Format

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
    /// The kernel tier asked for is unknown or beyond this CPU.
    case kernelTier(String)

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
        case .kernelTier(let detail):
            return detail
        }
    }
}

/// One expert's matrices, all neuron-major [ffn, hidden]: row j of each belongs to neuron j.
struct ExpertWeights: @unchecked Sendable {
    let gate: WeightMatrix
    let up: WeightMatrix
    let down: WeightMatrix

    /// Gate in groups of eight rows and up grouped too (rows or blocks): the grouped expert kernels.
    var groupedGateUp: Bool { gate.layout == .q4_0x8 && (up.layout == .q4_0x8 || up.layout == .q4_0b8) }
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

/// A SmallThinker model executing from a memory-mapped .stpk package: weight matrices are views
/// into the mapping, norms aside. Q4_0 matrices that `stquant` stored `row_major_x8` go straight
/// to the eight-row kernels. A package with plain Q4_0 rows (format 1, or `stquant --plain-rows`)
/// has its attention and output head regrouped at load (their mapped pages are then released, so
/// this costs load time, not memory) and, when `interleaveExperts`, the experts' gate and up too
/// (about 1.4 GB of anonymous memory on the 4B, so not when streaming experts).
public final class Model: @unchecked Sendable {
    public let package: PackageReader
    public let config: ModelConfig
    let embedding: WeightMatrix      // (vocab, hidden)
    let layers: [LayerWeights]
    let outputNorm: [Float]          // (hidden)
    let output: WeightMatrix         // (vocab, hidden); the embedding when tied
    /// Every expert as views into the mapping (what the expert cache reads and moves into its
    /// slots), whether or not `layers` holds regrouped copies of gate and up.
    let mappedExperts: [[ExpertWeights]]
    /// Owns the regrouped matrices.
    private let storage: WeightStorage?
    /// How many Q4_0 matrices were stored in plain rows and regrouped at load (0 for packages
    /// that store `row_major_x8`, stquant's default): worth telling the user, since
    /// re-running stquant stores them grouped and makes loading a memory map again.
    public let matricesRegroupedAtLoad: Int

    public convenience init(path: String, interleave: Bool = true, interleaveExperts: Bool = true) throws(FormatError) {
        try self.init(package: try PackageReader(path: path), interleave: interleave, interleaveExperts: interleaveExperts)
    }

    /// `interleave: false` keeps every matrix in place in the mapping (for comparisons).
    public init(package: PackageReader, interleave: Bool = true, interleaveExperts: Bool = true) throws(FormatError) {
        self.package = package
        let c = package.manifest.config
        config = c
        func matrix(_ name: String) -> WeightMatrix {
            // The reader has checked presence, shape and range of every tensor the config needs.
            let t = package.tensor(name)!
            return WeightMatrix(name: name, base: package.bytes(of: t).baseAddress!, dtype: t.dtype, rows: t.shape[0], columns: t.shape[1],
                                layout: WeightMatrix.Layout(t.layout))
        }
        func vector(_ name: String) -> [Float] {
            let t = package.tensor(name)!
            var out = [Float](repeating: 0, count: t.elementCount)
            out.withUnsafeMutableBufferPointer { TensorCodec.decode(package.bytes(of: t).baseAddress!, dtype: t.dtype, count: t.elementCount, into: $0.baseAddress!) }
            return out
        }
        var dense: [WeightMatrix] = []
        let mappedEmbedding = matrix(TensorNames.embedding)
        let mappedOutput = c.tieWordEmbeddings ? mappedEmbedding : matrix(TensorNames.output)
        dense.append(mappedOutput)
        for n in 0..<c.layerCount {
            dense += [matrix(TensorNames.query(n)), matrix(TensorNames.key(n)), matrix(TensorNames.value(n)), matrix(TensorNames.attentionOutput(n))]
        }
        var experts: [[ExpertWeights]] = []
        for n in 0..<c.layerCount {
            experts.append((0..<c.expertCount).map { e in
                ExpertWeights(gate: matrix(TensorNames.expertGate(n, e)), up: matrix(TensorNames.expertUp(n, e)),
                              down: matrix(TensorNames.expertDown(n, e)))
            })
        }
        mappedExperts = experts
        let expertGroups = interleaveExperts && experts.allSatisfy { $0.allSatisfy { $0.gate.canInterleave && $0.up.canInterleave } }
        if expertGroups { for layer in experts { for e in layer { dense += [e.gate, e.up] } } }
        // The routers (f32, read whole every token) are copied as they are, so that nothing read
        // every token stays in the mapping.
        let routerStart = dense.count
        dense += (0..<c.layerCount).map { matrix(TensorNames.router($0)) }
        if interleave {
            // The hot dense matrices are about to be copied to huge pages of their own; what stays
            // in the mapping (norms, routers, an untied embedding) is read a little at a time, and
            // with 2 MiB mappings each touch would bring back a released copy's neighbours.
            let bytes = package.mapping.bytes
            let end = package.manifest.bundles.first?.offset ?? bytes.count
            package.mapping.adviseSmallPages(UnsafeRawBufferPointer(rebasing: bytes[package.header.dataOffset..<end]))
        }
        let regrouped = interleave ? Model.interleave(dense, copyingAsIs: routerStart..<dense.count, mapping: package.mapping) : nil
        storage = regrouped?.storage
        matricesRegroupedAtLoad = regrouped == nil ? 0 : dense.filter(\.canInterleave).count
        let replaced = regrouped?.matrices ?? dense
        output = replaced[0]
        embedding = c.tieWordEmbeddings ? output : mappedEmbedding
        outputNorm = vector(TensorNames.outputNorm)
        layers = (0..<c.layerCount).map { n in
            LayerWeights(
                attentionNorm: vector(TensorNames.attentionNorm(n)),
                query: replaced[1 + 4 * n], key: replaced[2 + 4 * n],
                value: replaced[3 + 4 * n], output: replaced[4 + 4 * n],
                ffnNorm: vector(TensorNames.ffnNorm(n)), router: replaced[routerStart + n],
                experts: (0..<c.expertCount).map { e in
                    guard expertGroups, regrouped != nil else { return experts[n][e] }
                    let at = 1 + 4 * c.layerCount + 2 * (n * c.expertCount + e)
                    return ExpertWeights(gate: replaced[at], up: replaced[at + 1], down: experts[n][e].down)
                },
                rope: c.ropeLayout[n],
                window: c.slidingWindowLayout[n] ? c.slidingWindowSize : nil)
        }
    }

    /// Copies the Q4_0 matrices (regrouping plain rows, copying `.q4_0x8` ones as they are) into
    /// one anonymous allocation on transparent huge pages, in parallel and in chunks, releasing
    /// their mapped pages as it goes; the matrices at indices `plain` are copied unchanged (the
    /// f32 routers) and the others are returned as they are. nil when there is
    /// nothing to copy or no memory for it. The dense matrices are copied even when stored
    /// regrouped: read whole for every token, they stream measurably faster from huge pages
    /// (prompt processing ~10-15% on the 4B here) than from the page cache's 4 KiB pages.
    private static func interleave(_ matrices: [WeightMatrix], copyingAsIs plain: Range<Int>, mapping: MappedFile)
        -> (storage: WeightStorage, matrices: [WeightMatrix])? {
        var offsets: [Int?] = []
        var total = 0
        for (i, m) in matrices.enumerated() {
            if m.canInterleave || m.layout == .q4_0x8 || plain.contains(i) {
                offsets.append(total)
                total += (m.rows * m.rowBytes + 4095) / 4096 * 4096
            } else {
                offsets.append(nil)
            }
        }
        guard total > 0, let storage = WeightStorage(bytes: total) else { return nil }
        // Chunks of at most 4096 rows, so the output head spreads over every core.
        var jobs: [(source: UnsafeRawPointer, target: UnsafeMutableRawPointer, rowBytes: Int, rows: Int, regroup: Bool)] = []
        for (i, (m, offset)) in zip(matrices, offsets).enumerated() {
            guard let offset else { continue }
            var first = 0
            while first < m.rows {
                let rows = min(4096, m.rows - first)
                jobs.append((m.base + first * m.rowBytes, storage.base + offset + first * m.rowBytes, m.rowBytes, rows,
                             m.layout == .rows && !plain.contains(i)))
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
                if job.regroup {
                    Q4_0Groups.interleave(job.source, into: job.target, rowBytes: job.rowBytes, rowCount: job.rows)
                } else {
                    job.target.copyMemory(from: job.source, byteCount: job.rows * job.rowBytes)
                }
                mapping.release(UnsafeRawBufferPointer(start: job.source, count: job.rows * job.rowBytes))
            }
        }
        var result: [WeightMatrix] = []
        for (i, (m, offset)) in zip(matrices, offsets).enumerated() {
            guard let offset else { result.append(m); continue }
            result.append(WeightMatrix(name: m.name, base: storage.base + offset, dtype: m.dtype, rows: m.rows, columns: m.columns,
                                       layout: plain.contains(i) ? m.layout : .q4_0x8))
        }
        return (storage, result)
    }

    /// The default context: the model's limit, capped so a KV cache fits comfortably in memory.
    public var defaultContextLength: Int { min(config.maxPositionEmbeddings, 4096) }
}
