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
    public let position: Int
    /// Chosen experts, highest router logit first.
    public let experts: [Int]
    /// Their weights in the mixture (sum to 1).
    public let weights: [Float]
    /// The k-th highest router logit less the (k+1)-th: how far the choice is from a tie (a
    /// change in the logits smaller than this cannot change which experts are chosen).
    public let margin: Float
}

/// One conversation's state: the KV cache, the position, and every working buffer, allocated
/// once. `evaluate` runs a batch of tokens through the model and returns logits; decoding is a
/// batch of one. (The test target's ScalarForward.swift writes the same forward pass as plain
/// loops.)
public final class Session: @unchecked Sendable {
    public let model: Model
    /// Positions this session can hold; `evaluate` refuses to go past it.
    public let contextLength: Int
    /// The smallest `memoryBudget` a session of this model, context and thread count accepts:
    /// the dense part, the KV cache, the buffers and the process allowance, plus one layer's
    /// top-k expert bundles.
    public let minimumMemoryBudget: Int
    /// Tokens evaluated so far (the next token's position).
    public private(set) var position = 0
    /// Worker threads (fixed at creation: per-worker buffers are sized for it).
    public let threads: Int
    /// The kernel tier every computation of this session uses.
    public let kernels: DotKernels.InstructionSet
    /// Called for every routing decision when set.
    public var routingObserver: ((RoutingDecision) -> Void)?
    /// Called, when set, with the batch's residual stream (batch rows of `hidden` floats, the
    /// first at position `position`) at the input of each layer (0..<layers) and, as layer
    /// `layers`, at the output of the last one. It may read the stream (to record hidden
    /// states) or overwrite it (to give a layer another input: teacher forcing).
    var residualHook: ((_ layer: Int, _ position: Int, _ residual: UnsafeMutableBufferPointer<Float>) -> Void)?
    /// Called, when set, with each layer's expert input (batch rows of rmsnorm(x) after
    /// attention, the first at position `position`), after routing and before the experts run.
    var expertInputHook: ((_ layer: Int, _ position: Int, _ input: UnsafeBufferPointer<Float>) -> Void)?

    /// Tokens per forward batch; longer inputs are split. Each batch reads every expert its
    /// tokens chose once, so a batch this long gives a 64-expert layer about twelve tokens per
    /// expert to share each weight row's unpacking: at the 21B width, prompts ran 1.27x (AVX2)
    /// and 1.23x (AVX-512) as fast as in batches of 32.
    public static let maximumBatch = 128

    let caches: [KVCache]
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
    /// (active experts · decodeSlices, hidden): one token's expert sums per slice of an expert's
    /// neurons, handed out to whichever worker is free (`nextSlice`) and summed in slice order,
    /// so the result does not depend on which worker took which slice.
    let sliceSums: UnsafeMutablePointer<Float>
    let nextSlice = Atomic<Int>(0)
    static let decodeSlices = 4
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
    public init(
        model: Model, contextLength: Int? = nil, threads: Int = Session.defaultThreads,
        memoryBudget: Int? = nil, kernels: DotKernels.InstructionSet? = nil
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
        self.model = model
        self.contextLength = context
        self.threads = max(1, threads)
        let b = Session.maximumBatch
        caches = model.layers.map {
            KVCache(capacity: min(context, $0.window.map { $0 + b } ?? context), heads: c.kvHeads, headDim: c.headDim, window: $0.window)
        }
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
        currentExperts = Array(repeating: nil, count: c.expertCount)
        let plan = MemoryPlan(model: model, contextLength: context, threads: max(1, threads))
        minimumMemoryBudget = plan.fixedBytes + c.activeExperts * ExpertCache.slotBytes(of: model.package.manifest)
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
    }

    public static var defaultThreads: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Forgets the conversation.
    public func reset() { position = 0 }

    /// Runs `tokens` at the next positions. Returns logits (vocab floats per token) for every
    /// token when `allLogits`, else for the last one only.
    public func evaluate(_ tokens: [Int], allLogits: Bool = false) throws(EngineError) -> [Float] {
        let vocab = model.config.vocabSize
        guard !tokens.isEmpty else { throw .emptyInput }
        if let bad = tokens.first(where: { !(0..<vocab).contains($0) }) { throw .invalidToken(id: bad, vocabularySize: vocab) }
        guard position + tokens.count <= contextLength else { throw .contextFull(limit: contextLength) }
        return try DotKernels.with(kernels) { () throws(EngineError) in try evaluateBatches(tokens, allLogits: allLogits) }
    }

    private func evaluateBatches(_ tokens: [Int], allLogits: Bool) throws(EngineError) -> [Float] {
        let vocab = model.config.vocabSize
        var logits = [Float](repeating: 0, count: (allLogits ? tokens.count : 1) * vocab)
        var start = 0
        while start < tokens.count {
            let batch = Array(tokens[start..<min(start + Session.maximumBatch, tokens.count)])
            try forward(batch)
            let isLast = start + batch.count == tokens.count
            if allLogits || isLast {
                let first = allLogits ? 0 : batch.count - 1
                logits.withUnsafeMutableBufferPointer { out in
                    computeLogits(rows: first..<batch.count, into: out.baseAddress! + (allLogits ? start * vocab : 0))
                }
            }
            start += batch.count
        }
        return logits
    }

    // MARK: The forward pass

    /// Runs one batch through every layer, leaving the final residual stream in `residual`.
    func forward(_ tokens: [Int]) throws(EngineError) {
        let c = model.config
        let n = tokens.count
        residual.setCount(n)
        for (t, token) in tokens.enumerated() {
            model.embedding.decodeRow(token, into: residual.row(t))
            ropeTable.angles(position: position + t, into: ropeAngles + t * c.headDim)
        }
        for (index, layer) in model.layers.enumerated() {
            if let residualHook {
                residualHook(index, position, UnsafeMutableBufferPointer(start: residual.floats, count: n * c.hiddenSize))
                residual.setCount(n)  // it may have changed: no stale Q8_0 form
            }
            // Router first, on the raw residual: the experts are known before attention runs, so
            // their bundles can be read from storage while it does.
            MatMul.multiply(layer.router, residual, into: routerLogits, outputStride: c.expertCount, threads: threads)
            route(layer: index, count: n)
            if let expertCache {
                try expertCache.prefetch(layer: index, experts: UnsafeBufferPointer(start: assignments.used, count: assignments.usedCount))
                if expertCache.crossLayerEnabled, n == 1, index + 1 < model.layers.count { speculate(layer: index + 1, cache: expertCache) }
            }
            attend(layer: layer, cache: caches[index], count: n)
            try mixExperts(layer: layer, index: index, count: n)
        }
        residualHook?(model.layers.count, position, UnsafeMutableBufferPointer(start: residual.floats, count: n * c.hiddenSize))
        position += n
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
    func attend(layer: LayerWeights, cache: KVCache, count n: Int) {
        let c = model.config
        normed.setCount(n)
        for t in 0..<n { rmsNorm(residual.row(t), layer.attentionNorm, into: normed.row(t)) }
        MatMul.multiply(
            .init(weights: layer.query, output: queries, stride: c.queryWidth),
            .init(weights: layer.key, output: keys, stride: c.kvWidth),
            .init(weights: layer.value, output: values, stride: c.kvWidth), normed, threads: threads)
        attention.setCount(n)
        // Rotate and store every key and value of the batch first; a window's ring holds
        // window + maximumBatch positions, so this never overwrites a key a query of the batch
        // still needs.
        for t in 0..<n {
            let p = position + t
            let q = queries + t * c.queryWidth, k = keys + t * c.kvWidth
            if layer.rope {
                let table = UnsafePointer(ropeAngles + t * c.headDim)
                for h in 0..<c.attentionHeads { ropeTable.rotate(q + h * c.headDim, table: table) }
                for h in 0..<c.kvHeads { ropeTable.rotate(k + h * c.headDim, table: table) }
            }
            cache.store(key: k, value: values + t * c.kvWidth, position: p)
        }
        // One task per (token, key/value head): its group of query heads reads each cached key
        // and value once (grouped-query attention), streaming over the cache with no score
        // vector. When that makes fewer tasks than workers, groups are split.
        let chunks = max(1, min(c.groupSize, threads / max(1, n * c.kvHeads)))
        let tasks = n * c.kvHeads * chunks
        let workers = max(1, min(threads, tasks, position + n >= 64 || n > 1 ? threads : 1))
        let work = Unchecked((self, cache))
        parallelForOnThisTier(workers) { worker in
            let (session, cache) = work.value
            let c = session.model.config
            let scale = 1 / Float(c.headDim).squareRoot()
            for task in stride(from: worker, to: tasks, by: workers) {
                let t = task / (c.kvHeads * chunks), kvHead = task / chunks % c.kvHeads, chunk = task % chunks
                let firstHead = kvHead * c.groupSize + c.groupSize * chunk / chunks
                let heads = kvHead * c.groupSize + c.groupSize * (chunk + 1) / chunks - firstHead
                let p = session.position + t
                let first = cache.window.map { max(0, p - $0 + 1) } ?? 0
                st_attend(
                    session.queries + t * c.queryWidth + firstHead * c.headDim, Int32(heads),
                    cache.keys(head: kvHead), cache.values(head: kvHead), Int32(cache.capacity), Int32(c.headDim),
                    Int32(first), Int32(p), Int32(c.headDim), scale, session.attention.row(t) + firstHead * c.headDim)
            }
        }
        MatMul.multiply(layer.output, attention, into: projected, outputStride: c.hiddenSize, threads: threads)
        st_add_rows(residual.floats, projected, 1, 0, Int32(n * c.hiddenSize))
        residual.setCount(n)
    }

    /// Logits for batch rows `rows` of the final residual: lm_head · rmsnorm(x, norm).
    func computeLogits(rows: Range<Int>, into out: UnsafeMutablePointer<Float>) {
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

/// Keys and values of one layer, float32. Global layers keep every position; sliding-window
/// layers keep the last `window` in a ring.
final class KVCache: @unchecked Sendable {
    let capacity: Int
    let heads: Int
    let headDim: Int
    let window: Int?
    /// (kv_heads, capacity, head_dim): each key/value head's positions side by side, so the
    /// attention task of one head streams one contiguous range instead of every other half row.
    let keys: UnsafeMutablePointer<Float>
    let values: UnsafeMutablePointer<Float>

    init(capacity: Int, heads: Int, headDim: Int, window: Int?) {
        self.capacity = capacity
        self.heads = heads
        self.headDim = headDim
        self.window = window
        keys = .allocate(capacity: heads * capacity * headDim)
        values = .allocate(capacity: heads * capacity * headDim)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always) func keys(head: Int) -> UnsafeMutablePointer<Float> { keys + head * capacity * headDim }
    @inline(__always) func values(head: Int) -> UnsafeMutablePointer<Float> { values + head * capacity * headDim }

    /// Stores the keys and values of every head (`heads · head_dim` floats each) at `position`.
    func store(key k: UnsafePointer<Float>, value v: UnsafePointer<Float>, position: Int) {
        let slot = position % capacity
        for h in 0..<heads {
            (keys(head: h) + slot * headDim).update(from: k + h * headDim, count: headDim)
            (values(head: h) + slot * headDim).update(from: v + h * headDim, count: headDim)
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
