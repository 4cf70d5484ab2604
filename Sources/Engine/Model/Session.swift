import CKernels
import Synchronization
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What the router chose for one token in one layer (for tests and diagnostics).
public struct RoutingDecision: Sendable {
    public let layer: Int
    /// The token's sequence (0 in a one-sequence session) and its position there.
    public let sequence: Int
    public let position: Int
    /// Chosen experts, highest router logit first.
    public let experts: [Int]
    /// Their weights in the mixture (sum to 1).
    public let weights: [Float]
    /// The k-th highest router logit less the (k+1)-th: how far the choice is from a tie (a
    /// change in the logits smaller than this cannot change which experts are chosen).
    public let margin: Float
}

/// A step of tokens from one sequence of a session: `tokens` go at that sequence's next
/// positions. `logits` says which of their positions' logits the step returns.
public struct SequenceChunk: Sendable {
    public enum Logits: Sendable { case none, last, all }
    public var sequence: Int
    public var tokens: [Int]
    public var logits: Logits
    public init(sequence: Int, tokens: [Int], logits: Logits = .last) {
        self.sequence = sequence
        self.tokens = tokens
        self.logits = logits
    }
}

/// Where one row of a forward batch belongs: its sequence and its position there.
struct StepRow: Sendable {
    var sequence: Int
    var position: Int
}

/// One or more conversations' state and every working buffer, allocated once. Each sequence
/// has its own KV cache (its sliding-window rings included) and position; everything else (the
/// buffers, the expert cache) is shared. `evaluate` runs tokens of one sequence through the
/// model; `evaluate(_:)` with chunks runs one forward step over tokens of several sequences at
/// once, reading each dense matrix once for all of them and each chosen expert once for all the
/// tokens that chose it. Decoding is a batch of one token per sequence. (The test target's
/// ScalarForward.swift writes the same forward pass as plain loops.)
public final class Session: @unchecked Sendable {
    public let model: Model
    /// Positions each sequence can hold; `evaluate` refuses to go past it.
    public let contextLength: Int
    /// The smallest `memoryBudget` a session of this model, context, thread count and number of
    /// sequences accepts: the dense part, every sequence's KV cache, the buffers and the process
    /// allowance, plus one layer's top-k expert bundles.
    public let minimumMemoryBudget: Int
    /// Sequences this session holds (fixed at creation: their KV caches are allocated once).
    public var sequenceCount: Int { sequences.count }
    /// Tokens the first sequence has evaluated so far (its next token's position).
    public var position: Int { sequences[0].position }
    /// Tokens sequence `sequence` has evaluated so far.
    public func position(of sequence: Int) -> Int { sequences[sequence].position }
    /// Worker threads (fixed at creation: per-worker buffers are sized for it).
    public let threads: Int
    /// The kernel tier every computation of this session uses.
    public let kernels: DotKernels.InstructionSet
    /// What the KV caches store keys and values as.
    public let kvType: KVCacheType
    /// What this session holds besides the expert cache (its KV caches among it).
    public let memoryPlan: MemoryPlan
    /// Called for every routing decision when set.
    public var routingObserver: ((RoutingDecision) -> Void)?
    /// Called, when set, with the batch's residual stream (batch rows of `hidden` floats, row t
    /// at `rows[t]`) at the input of each layer (0..<layers) and, as layer `layers`, at the
    /// output of the last one. It may read the stream (to record hidden states) or overwrite it
    /// (to give a layer another input: teacher forcing).
    var residualHook: ((_ layer: Int, _ rows: [StepRow], _ residual: UnsafeMutableBufferPointer<Float>) -> Void)?
    /// Called, when set, with each layer's expert input (batch rows of rmsnorm(x) after
    /// attention, row t at `rows[t]`), after routing and before the experts run.
    var expertInputHook: ((_ layer: Int, _ rows: [StepRow], _ input: UnsafeBufferPointer<Float>) -> Void)?
    /// Where in a layer's attention `attentionHook` is called.
    enum AttentionStage {
        /// rmsnorm(x) ⊙ attention_norm, what W_q, W_k and W_v multiply: batch rows of `hidden`.
        case input
        /// The heads' outputs side by side, what W_o multiplies: batch rows of `queryWidth`.
        case output
    }
    /// Called, when set, with the inputs of each layer's attention matrices.
    var attentionHook: ((_ layer: Int, _ stage: AttentionStage, _ values: UnsafeBufferPointer<Float>) -> Void)?
    /// Called, when set, after each layer's experts ran, once per chosen expert with the batch
    /// rows that chose it and their ReGLU activations relu(W_gate h) ⊙ (W_up h) (what W_down
    /// multiplies, before the mixture weight): `rows.count` rows of `ffn` floats. Setting it makes
    /// the experts take paths that write the activations down (`activationRows`), not the fused
    /// one-token kernels, so a step computes the same function at a different speed.
    var expertActivationHook:
        ((_ layer: Int, _ expert: Int, _ rows: UnsafeBufferPointer<Int>, _ activations: UnsafeBufferPointer<Float>) -> Void)?
    {
        didSet {
            if expertActivationHook != nil, activationRows == nil {
                let c = model.config
                activationRows = .allocate(capacity: Session.maximumBatch * c.activeExperts * c.expertFFNSize)
            }
        }
    }
    /// (batch · active experts, ffn): a step's activations, each expert's tokens from
    /// `assignments.firstRow`, while `expertActivationHook` is set.
    private(set) var activationRows: UnsafeMutablePointer<Float>?
    /// Distinct experts the forward steps have chosen, summed over layers and steps, and the
    /// steps counted (`resetStepStatistics` zeroes both): what a step reads of the experts.
    public private(set) var expertsChosen = 0
    public private(set) var stepsRun = 0
    public func resetStepStatistics() { (expertsChosen, stepsRun) = (0, 0) }

    /// Tokens per forward batch; longer inputs are split. Each batch reads every expert its
    /// tokens chose once, so a batch this long gives a 64-expert layer about twelve tokens per
    /// expert to share each weight row's unpacking: at the 21B width, prompts ran 1.27x (AVX2)
    /// and 1.23x (AVX-512) as fast as in batches of 32.
    public static let maximumBatch = 128

    let sequences: [SequenceState]
    /// The rows of the batch being computed (capacity `maximumBatch`, reserved once).
    var rows: [StepRow] = []
    /// Owns the buffers below that are not activation batches (`SessionBuffer` lists them).
    let arena: SessionArena
    let residual: ActivationBatch  // (batch, hidden): the residual stream, also the router input
    let normed: ActivationBatch  // (batch, hidden)
    let queries: UnsafeMutablePointer<Float>  // (batch, heads·head_dim)
    let keys: UnsafeMutablePointer<Float>  // (batch, kv_heads·head_dim)
    let values: UnsafeMutablePointer<Float>  // (batch, kv_heads·head_dim)
    let attention: ActivationBatch  // (batch, heads·head_dim)
    let projected: UnsafeMutablePointer<Float>  // (batch, hidden)
    let routerLogits: UnsafeMutablePointer<Float>  // (batch, experts)
    let predictedLogits: UnsafeMutablePointer<Float>  // (experts): decoding, the next layer's router on this layer's input
    let predictedExperts: UnsafeMutablePointer<Int>  // (active experts): its top k
    let mixture: UnsafeMutablePointer<Float>  // (batch, hidden)
    let partials: UnsafeMutablePointer<Float>  // (threads, batch, hidden): per-worker expert sums
    /// (decodeTokens · active experts · decodeSlices, hidden): a decode step's sums per (expert,
    /// token) pair and slice of the expert's neurons, handed out to whichever worker is free
    /// (`nextSlice`) and summed in slice order, so the result does not depend on which worker
    /// took which slice.
    let sliceSums: UnsafeMutablePointer<Float>
    let nextSlice = Atomic<Int>(0)
    /// The attention tasks of a step, handed out the same way, and its tiles (row ranges).
    let nextTask = Atomic<Int>(0)
    var tiles: [Range<Int>] = []
    /// Tokens of one sequence whose queries attend together, reading each cached key and value
    /// once for all of them (fewer when a group of heads times this is over ST_TILE_QUERIES, so
    /// that the tile goes through the matrix-product kernel).
    static let attentionTile = 16
    static let decodeSlices = 4
    /// Steps of at most this many tokens (decoding, one per sequence) go through the experts a
    /// token at a time with the one-token kernel (`decode`); longer ones expert by expert, each
    /// weight row unpacked once for all the expert's tokens.
    static let decodeTokens = 8
    /// (decodeTokens · active experts): the (expert, token) pairs of a decode step, the first
    /// `decodePairCount` in use.
    let decodePairs: UnsafeMutablePointer<ExpertPair>
    var decodePairCount = 0
    /// (threads, gateBufferStride): per worker, gate then gate·up (a batch: eight neurons' gate
    /// and up values for each of up to `maximumBatch` tokens).
    let gateBuffers: UnsafeMutablePointer<Float>
    static func gateBufferStride(ffn: Int) -> Int { max(2 * ffn, 16 * maximumBatch) }
    let activeIndices: UnsafeMutablePointer<Int32>  // (threads, ffn): per-worker active neuron list
    let upTokens: UnsafeMutablePointer<Int32>  // (threads, batch): per worker, the tokens an up row is read for
    /// (threads, batch, ffn): per worker and token, the down rows a batch's token adds and their
    /// scales (so each token's rows go through the many-row kernel at once).
    let downRows: UnsafeMutablePointer<Int32>
    let downScales: UnsafeMutablePointer<Float>
    /// (threads, 2 · ffn) and (threads, 2, 2 · ffn): per worker, two tokens' down rows merged into
    /// one list, with each token's coefficients (zero where the row is the other token's).
    let pairRows: UnsafeMutablePointer<Int32>
    let pairCoefficients: UnsafeMutablePointer<Float>
    let expertInputs: ActivationBatch  // (batch · active experts, hidden): a batch's tokens grouped by expert
    let assignments: ExpertAssignments
    let ropeTable: RoPETable
    let ropeAngles: UnsafeMutablePointer<Float>  // (batch, head_dim): cos then sin of each token's angles

    /// Expert bundles streamed under a memory budget (nil: every expert read from the mapping).
    public let expertCache: ExpertCache?
    /// The chosen experts' weights for the layer being computed (streamed or mapped).
    var currentExperts: [ExpertWeights?]

    /// - Parameter memoryBudget: bytes for everything this session holds: the dense tensors, the
    ///   KV cache, working buffers, a fixed allowance for the process itself, and, with the rest,
    ///   a cache of expert bundles streamed from the package. nil: the whole package is mapped.
    /// - Parameter kernels: the kernel tier (nil: `DotKernels.configured()`, the environment's
    ///   `STRUN_KERNELS` or the best this CPU has); one this CPU lacks is an error.
    /// - Parameter sequences: how many sequences the session holds, each with a KV cache of
    ///   `contextLength` positions. Under a memory budget too small for that many, the error
    ///   names the largest count that fits.
    /// - Parameter kvType: what the KV caches store keys and values as.
    public init(
        model: Model, contextLength: Int? = nil, threads: Int = Session.defaultThreads,
        memoryBudget: Int? = nil, kernels: DotKernels.InstructionSet? = nil, sequences: Int = 1,
        kvType: KVCacheType = .default
    ) throws(EngineError) {
        if let kernels {
            try DotKernels.require(kernels, source: "the session")
            self.kernels = kernels
        } else {
            self.kernels = try DotKernels.configured()
        }
        let c = model.config
        let context = contextLength ?? model.defaultContextLength
        guard context >= 1, context <= c.maxPositionEmbeddings else {
            throw .contextLength(requested: context, maximum: c.maxPositionEmbeddings)
        }
        guard sequences >= 1 else { throw .sequenceCount(requested: sequences, fits: nil, budget: nil) }
        guard kvType.rowBytes(headDim: c.headDim) != nil else { throw .kvCacheType(kvType, headDim: c.headDim) }
        self.kvType = kvType
        self.model = model
        self.contextLength = context
        self.threads = max(1, threads)
        let b = Session.maximumBatch
        let plan = MemoryPlan(model: model, contextLength: context, threads: max(1, threads), sequences: sequences, kvType: kvType)
        memoryPlan = plan
        minimumMemoryBudget = plan.minimumBudget
        if let memoryBudget, sequences > 1, memoryBudget < minimumMemoryBudget {
            // The largest count whose KV caches and expert minimum fit.
            let one = MemoryPlan(model: model, contextLength: context, threads: max(1, threads), sequences: 1, kvType: kvType)
            throw .sequenceCount(requested: sequences, fits: one.sequencesFitting(budget: memoryBudget), budget: memoryBudget)
        }
        self.sequences = (0..<sequences).map { _ in SequenceState(model: model, context: context, kvType: kvType) }
        rows.reserveCapacity(b)
        residual = ActivationBatch(columns: c.hiddenSize, capacity: b)
        normed = ActivationBatch(columns: c.hiddenSize, capacity: b)
        let arena = SessionArena(c, threads: max(1, threads))
        self.arena = arena
        queries = arena.pointer(.queries, as: Float.self)
        keys = arena.pointer(.keys, as: Float.self)
        values = arena.pointer(.values, as: Float.self)
        attention = ActivationBatch(columns: c.queryWidth, capacity: b)
        projected = arena.pointer(.projected, as: Float.self)
        routerLogits = arena.pointer(.routerLogits, as: Float.self)
        predictedLogits = arena.pointer(.predictedLogits, as: Float.self)
        predictedExperts = arena.pointer(.predictedExperts, as: Int.self)
        mixture = arena.pointer(.mixture, as: Float.self)
        partials = arena.pointer(.partials, as: Float.self)
        sliceSums = arena.pointer(.sliceSums, as: Float.self)
        gateBuffers = arena.pointer(.gateBuffers, as: Float.self)
        expertInputs = ActivationBatch(columns: c.hiddenSize, capacity: b * c.activeExperts)
        assignments = ExpertAssignments(experts: c.expertCount, active: c.activeExperts, batch: b)
        activeIndices = arena.pointer(.activeIndices, as: Int32.self)
        upTokens = arena.pointer(.upTokens, as: Int32.self)
        downRows = arena.pointer(.downRows, as: Int32.self)
        downScales = arena.pointer(.downScales, as: Float.self)
        pairRows = arena.pointer(.pairRows, as: Int32.self)
        pairCoefficients = arena.pointer(.pairCoefficients, as: Float.self)
        ropeTable = RoPETable(headDim: c.headDim, theta: c.ropeTheta)
        ropeAngles = arena.pointer(.ropeAngles, as: Float.self)
        decodePairs = arena.pointer(.decodePairs, as: ExpertPair.self)
        currentExperts = Array(repeating: nil, count: c.expertCount)
        if let memoryBudget {
            let forExperts = memoryBudget - plan.fixedBytes
            guard forExperts > 0 else {
                throw .budgetBelowDensePart(budget: memoryBudget, needed: plan.fixedBytes, parts: plan.description)
            }
            expertCache = try ExpertCache(package: model.package, capacityBytes: forExperts)
        } else {
            expertCache = nil
        }
    }

    deinit {
        expertCache?.shutdown()
        activationRows?.deallocate()
    }

    public static var defaultThreads: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Forgets every sequence's conversation (their caches are kept and overwritten).
    public func reset() { for s in sequences { s.position = 0 } }

    /// Forgets sequence `sequence`'s conversation, keeping its cache for the next one.
    public func reset(sequence: Int) { sequences[sequence].position = 0 }

    /// Keeps sequence `sequence`'s first `length` positions and forgets the rest, so the next
    /// token goes at `length` (a prompt that begins with what the sequence holds evaluates only
    /// what is new). Returns false, changing nothing, when that is impossible: a sliding-window
    /// layer's ring has already overwritten keys that a query at `length` would need.
    public func truncate(sequence: Int, to length: Int) -> Bool {
        let state = sequences[sequence]
        guard length >= 0, length <= state.position else { return false }
        for cache in state.caches {
            // A query at `length` reads positions from length − window + 1; the ring holds the
            // last `capacity` positions stored.
            if let window = cache.window, max(0, length - window + 1) < state.position - cache.capacity { return false }
        }
        state.position = length
        return true
    }

    /// Runs `tokens` at the first sequence's next positions. Returns logits (vocab floats per
    /// token) for every token when `allLogits`, else for the last one only.
    public func evaluate(_ tokens: [Int], allLogits: Bool = false) throws(EngineError) -> [Float] {
        let vocab = model.config.vocabSize
        try check(SequenceChunk(sequence: 0, tokens: tokens))
        return try DotKernels.with(kernels) { () throws(EngineError) in
            var logits = [Float](repeating: 0, count: (allLogits ? tokens.count : 1) * vocab)
            var start = 0
            while start < tokens.count {
                let batch = Array(tokens[start..<min(start + Session.maximumBatch, tokens.count)])
                let isLast = start + batch.count == tokens.count
                let want: SequenceChunk.Logits = allLogits ? .all : isLast ? .last : .none
                try logits.withUnsafeMutableBufferPointer { (out) throws(EngineError) in
                    try step(
                        [SequenceChunk(sequence: 0, tokens: batch, logits: want)], into: out.baseAddress! + (allLogits ? start * vocab : 0))
                }
                start += batch.count
            }
            return logits
        }
    }

    /// One forward step over chunks of several sequences (each sequence at most once, at most
    /// `maximumBatch` tokens in all). Returns the logits the chunks ask for, vocab floats per
    /// position, in chunk order.
    public func evaluate(_ chunks: [SequenceChunk]) throws(EngineError) -> [Float] {
        let rows = chunks.reduce(0) { $0 + Session.logitRows($1) }
        var logits = [Float](repeating: 0, count: rows * model.config.vocabSize)
        try logits.withUnsafeMutableBufferPointer { (out) throws(EngineError) in try evaluate(chunks, into: out) }
        return logits
    }

    /// `evaluate(_:)` writing into `logits` (at least vocab floats per position asked for), so a
    /// step allocates nothing.
    public func evaluate(_ chunks: [SequenceChunk], into logits: UnsafeMutableBufferPointer<Float>) throws(EngineError) {
        guard !chunks.isEmpty else { throw .emptyInput }
        var total = 0, rows = 0
        for (i, chunk) in chunks.enumerated() {
            try check(chunk)
            if chunks[..<i].contains(where: { $0.sequence == chunk.sequence }) { throw .duplicateSequence(chunk.sequence) }
            total += chunk.tokens.count
            rows += Session.logitRows(chunk)
        }
        guard total <= Session.maximumBatch else { throw .batchTooLarge(tokens: total, maximum: Session.maximumBatch) }
        precondition(logits.count >= rows * model.config.vocabSize, "logits buffer too small")
        try DotKernels.with(kernels) { () throws(EngineError) in try step(chunks, into: logits.baseAddress!) }
    }

    static func logitRows(_ chunk: SequenceChunk) -> Int {
        switch chunk.logits {
        case .none: 0
        case .last: 1
        case .all: chunk.tokens.count
        }
    }

    /// A chunk's sequence, tokens and room in the context.
    private func check(_ chunk: SequenceChunk) throws(EngineError) {
        let vocab = model.config.vocabSize
        guard sequences.indices.contains(chunk.sequence) else { throw .invalidSequence(chunk.sequence, count: sequences.count) }
        guard !chunk.tokens.isEmpty else { throw .emptyInput }
        if let bad = chunk.tokens.first(where: { !(0..<vocab).contains($0) }) { throw .invalidToken(id: bad, vocabularySize: vocab) }
        guard sequences[chunk.sequence].position + chunk.tokens.count <= contextLength else { throw .contextFull(limit: contextLength) }
    }

    /// Runs the chunks (checked) as one batch and writes the logits they ask for.
    private func step(_ chunks: [SequenceChunk], into logits: UnsafeMutablePointer<Float>) throws(EngineError) {
        rows.removeAll(keepingCapacity: true)
        var tokens: [Int] = []
        tokens.reserveCapacity(Session.maximumBatch)
        for chunk in chunks {
            let start = sequences[chunk.sequence].position
            for (i, token) in chunk.tokens.enumerated() {
                rows.append(StepRow(sequence: chunk.sequence, position: start + i))
                tokens.append(token)
            }
        }
        try forward(tokens)
        var wanted: [Int] = []
        var first = 0
        for chunk in chunks {
            switch chunk.logits {
            case .none: break
            case .last: wanted.append(first + chunk.tokens.count - 1)
            case .all: wanted += first..<first + chunk.tokens.count
            }
            first += chunk.tokens.count
        }
        // At most `maximumBatch` rows ask for logits: `normed` holds them all.
        if !wanted.isEmpty { computeLogits(rows: wanted, into: logits) }
    }

    // MARK: The forward pass

    /// Runs one batch (row t is `tokens[t]` at `rows[t]`) through every layer, leaving the final
    /// residual stream in `residual` and moving each sequence's position past its rows.
    func forward(_ tokens: [Int]) throws(EngineError) {
        let c = model.config
        let n = tokens.count
        residual.setCount(n)
        for (t, token) in tokens.enumerated() {
            model.embedding.decodeRow(token, into: residual.row(t))
            ropeTable.angles(position: rows[t].position, into: ropeAngles + t * c.headDim)
        }
        for (index, layer) in model.layers.enumerated() {
            if let residualHook {
                residualHook(index, rows, UnsafeMutableBufferPointer(start: residual.floats, count: n * c.hiddenSize))
                residual.setCount(n)  // it may have changed: no stale Q8_0 form
            }
            // Router first, on the raw residual: the experts are known before attention runs, so
            // their bundles can be read from storage while it does.
            MatMul.multiply(layer.router, residual, into: routerLogits, outputStride: c.expertCount, threads: threads)
            route(layer: index, count: n)
            expertsChosen += assignments.usedCount
            if let expertCache {
                try expertCache.prefetch(layer: index, experts: UnsafeBufferPointer(start: assignments.used, count: assignments.usedCount))
                if expertCache.crossLayerEnabled, n == 1, index + 1 < model.layers.count { speculate(layer: index + 1, cache: expertCache) }
            }
            attend(layer: layer, index: index, count: n)
            try mixExperts(layer: layer, index: index, count: n)
        }
        residualHook?(model.layers.count, rows, UnsafeMutableBufferPointer(start: residual.floats, count: n * c.hiddenSize))
        for row in rows { sequences[row.sequence].position = max(sequences[row.sequence].position, row.position + 1) }
        stepsRun += 1
    }

    /// Cross-layer prefetch while decoding: layer `next`'s router applied to the current layer's
    /// input (the residual stream before this layer's attention) predicts `next`'s choice; the
    /// cache starts reading the predicted bundles it lacks behind the demand reads. The
    /// prediction only schedules reads: what the model computes does not depend on it.
    func speculate(layer next: Int, cache: ExpertCache) {
        let c = model.config
        MatMul.multiply(model.layers[next].router, residual, into: predictedLogits, outputStride: c.expertCount, threads: 1)
        ExpertAssignments.topK(predictedLogits, count: c.expertCount, k: c.activeExperts, into: predictedExperts)
        cache.speculate(layer: next, experts: UnsafeBufferPointer(start: predictedExperts, count: c.activeExperts))
    }

    /// x += Wo · attention(rmsnorm(x)) for the batch.
    func attend(layer: LayerWeights, index: Int, count n: Int) {
        let c = model.config
        normed.setCount(n)
        for t in 0..<n { rmsNorm(residual.row(t), layer.attentionNorm, into: normed.row(t)) }
        attentionHook?(index, .input, UnsafeBufferPointer(start: normed.floats, count: n * c.hiddenSize))
        MatMul.multiply(
            .init(weights: layer.query, output: queries, stride: c.queryWidth),
            .init(weights: layer.key, output: keys, stride: c.kvWidth),
            .init(weights: layer.value, output: values, stride: c.kvWidth), normed, threads: threads)
        attention.setCount(n)
        // Rotate and store every key and value of the batch first; a window's ring holds
        // window + maximumBatch positions, so this never overwrites a key a query of the batch
        // still needs.
        for t in 0..<n {
            let p = rows[t].position
            let q = queries + t * c.queryWidth, k = keys + t * c.kvWidth
            if layer.rope {
                let table = UnsafePointer(ropeAngles + t * c.headDim)
                for h in 0..<c.attentionHeads { ropeTable.rotate(q + h * c.headDim, table: table) }
                for h in 0..<c.kvHeads { ropeTable.rotate(k + h * c.headDim, table: table) }
            }
            sequences[rows[t].sequence].caches[index].store(key: k, value: values + t * c.kvWidth, position: p)
        }
        // One task per tile (up to `attentionTile` consecutive tokens of one sequence) and key/value
        // head: its queries (the head's group of query heads for each of the tile's tokens) read
        // each cached key and value once. When that makes fewer tasks than workers, groups are
        // split. Tasks go to whichever worker is free, the last tiles (the longest histories) first.
        tiles.removeAll(keepingCapacity: true)
        let tile = max(1, min(Session.attentionTile, Int(ST_TILE_QUERIES) / c.groupSize))
        var start = 0
        while start < n {
            var end = start + 1
            while end < n, end - start < tile, rows[end].sequence == rows[start].sequence,
                rows[end].position == rows[end - 1].position + 1
            {
                end += 1
            }
            tiles.append(start..<end)
            start = end
        }
        let chunks = max(1, min(c.groupSize, threads / max(1, tiles.count * c.kvHeads)))
        let tasks = tiles.count * c.kvHeads * chunks
        let workers = max(1, min(threads, tasks, rows[0].position + n >= 64 || n > 1 ? threads : 1))
        nextTask.store(0, ordering: .relaxed)
        let work = Unchecked(self)
        parallelForOnThisTier(workers) { _ in
            let session = work.value
            let c = session.model.config
            let scale = 1 / Float(c.headDim).squareRoot()
            while true {
                let task = session.nextTask.add(1, ordering: .relaxed).oldValue
                guard task < tasks else { break }
                let tile = session.tiles[session.tiles.count - 1 - task / (c.kvHeads * chunks)]
                let kvHead = task / chunks % c.kvHeads, chunk = task % chunks
                let firstHead = kvHead * c.groupSize + c.groupSize * chunk / chunks
                let heads = kvHead * c.groupSize + c.groupSize * (chunk + 1) / chunks - firstHead
                let t = tile.lowerBound, row = session.rows[t], cache = session.sequences[row.sequence].caches[index]
                st_attend(
                    session.queries + t * c.queryWidth + firstHead * c.headDim, Int32(c.queryWidth), Int32(tile.count), Int32(heads),
                    cache.keys(head: kvHead), cache.values(head: kvHead), cache.type.code, Int32(cache.capacity), Int32(cache.rowBytes),
                    Int32(row.position), Int32(cache.window ?? 0), Int32(c.headDim), scale,
                    session.attention.row(t) + firstHead * c.headDim, Int32(c.queryWidth))
            }
        }
        attentionHook?(index, .output, UnsafeBufferPointer(start: attention.floats, count: n * c.queryWidth))
        MatMul.multiply(layer.output, attention, into: projected, outputStride: c.hiddenSize, threads: threads)
        st_add_rows(residual.floats, projected, 1, 0, Int32(n * c.hiddenSize))
        residual.setCount(n)
    }

    /// Logits for batch rows `rows` of the final residual, one after another: lm_head ·
    /// rmsnorm(x, norm).
    func computeLogits(rows: [Int], into out: UnsafeMutablePointer<Float>) {
        let c = model.config
        normed.setCount(rows.count)
        for (i, t) in rows.enumerated() { rmsNorm(residual.row(t), model.outputNorm, into: normed.row(i)) }
        MatMul.multiply(model.output, normed, into: out, outputStride: c.vocabSize, threads: threads)
    }

    /// The final-norm output of the last batch's rows (for tests against `final_norm_out`).
    func rmsNorm(_ x: UnsafePointer<Float>, _ weight: [Float], into out: UnsafeMutablePointer<Float>) {
        weight.withUnsafeBufferPointer { w in _ = st_rms_norm(x, w.baseAddress!, model.config.rmsNormEps, out, Int32(w.count)) }
    }
}

/// One sequence's state: a KV cache per layer and the position of its next token. Reused from
/// one conversation to the next (`Session.reset(sequence:)` only moves the position).
final class SequenceState: @unchecked Sendable {
    let caches: [KVCache]
    var position = 0

    init(model: Model, context: Int, kvType: KVCacheType) {
        let c = model.config
        caches = model.layers.map {
            KVCache(
                capacity: KVCache.capacity(context: context, window: $0.window), heads: c.kvHeads, headDim: c.headDim, window: $0.window,
                type: kvType)
        }
    }
}

/// RoPE in the rotate-half (NeoX) form over the whole head: pairs (i, i + d/2), angle p·θ_i with
/// θ_i = theta^(−2i/d). Frequencies and angles in double precision, never rounded to bf16.
struct RoPETable {
    let headDim: Int
    let frequencies: [Double]

    init(headDim: Int, theta: Double) {
        self.headDim = headDim
        frequencies = (0..<headDim / 2).map { pow(theta, -2 * Double($0) / Double(headDim)) }
    }

    /// cos and sin of every angle at `position` (head_dim/2 of each), computed once per token
    /// and shared by every head of every RoPE layer.
    func angles(position: Int, into table: UnsafeMutablePointer<Float>) {
        let half = headDim / 2
        for i in 0..<half {
            let angle = Double(position) * frequencies[i]
            table[i] = Float(cos(angle))
            table[half + i] = Float(sin(angle))
        }
    }

    func rotate(_ v: UnsafeMutablePointer<Float>, table: UnsafePointer<Float>) {
        let half = headDim / 2
        for i in 0..<half {
            let c = table[i], s = table[half + i]
            let a = v[i], b = v[i + half]
            v[i] = a * c - b * s
            v[i + half] = b * c + a * s
        }
    }
}
