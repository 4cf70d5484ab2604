import CKernels
#if canImport(Glibc)
import Glibc
#endif

/// What the router chose for one token in one layer (for tests and diagnostics).
public struct RoutingDecision: Sendable {
    public let layer: Int
    public let position: Int
    /// Chosen experts, highest router logit first.
    public let experts: [Int]
    /// Their weights in the mixture (sum to 1).
    public let weights: [Float]
}

/// One conversation's state: the KV cache, the position, and every working buffer, allocated
/// once. `evaluate` runs a batch of tokens through the model (SMALLTHINKER.md §3) and returns
/// logits; decoding is a batch of one.
public final class Session: @unchecked Sendable {
    public let model: Model
    /// Positions this session can hold; `evaluate` refuses to go past it.
    public let contextLength: Int
    /// Tokens evaluated so far (the next token's position).
    public private(set) var position = 0
    /// Worker threads (fixed at creation: per-worker buffers are sized for it).
    public let threads: Int
    /// Called for every routing decision when set.
    public var routingObserver: ((RoutingDecision) -> Void)?

    /// Tokens per forward batch; longer inputs are split.
    public static let maximumBatch = 32

    let caches: [KVCache]
    let residual: ActivationBatch      // (batch, hidden): the residual stream, also the router input
    let normed: ActivationBatch        // (batch, hidden)
    let queries: UnsafeMutablePointer<Float>     // (batch, heads·head_dim)
    let keys: UnsafeMutablePointer<Float>        // (batch, kv_heads·head_dim)
    let values: UnsafeMutablePointer<Float>      // (batch, kv_heads·head_dim)
    let attention: ActivationBatch     // (batch, heads·head_dim)
    let projected: UnsafeMutablePointer<Float>   // (batch, hidden)
    let routerLogits: UnsafeMutablePointer<Float> // (batch, experts)
    let mixture: UnsafeMutablePointer<Float>     // (batch, hidden)
    let partials: UnsafeMutablePointer<Float>    // (threads, batch, hidden): per-worker expert sums
    let gateBuffers: UnsafeMutablePointer<Float> // (threads, ffn): per-worker gate, then gate·up
    let activeIndices: UnsafeMutablePointer<Int32> // (threads, ffn): per-worker active neuron list
    let expertInputs: ActivationBatch  // (batch · active experts, hidden): a batch's tokens grouped by expert
    let scores: UnsafeMutablePointer<Float>      // (threads, context): each worker's attention scores
    let ropeTable: RoPETable
    let ropeAngles: UnsafeMutablePointer<Float>  // (batch, head_dim): cos then sin of each token's angles

    public init(model: Model, contextLength: Int? = nil, threads: Int = Session.defaultThreads) throws(EngineError) {
        let c = model.config
        let context = contextLength ?? model.defaultContextLength
        guard context >= 1, context <= c.maxPositionEmbeddings else {
            throw .invalidRequest("context length \(context) is outside 1...\(c.maxPositionEmbeddings) (the model's max_position_embeddings)")
        }
        self.model = model
        self.contextLength = context
        self.threads = max(1, threads)
        let b = Session.maximumBatch
        caches = model.layers.map { KVCache(capacity: min(context, $0.window.map { $0 + b } ?? context), width: c.kvWidth, window: $0.window) }
        residual = ActivationBatch(columns: c.hiddenSize, capacity: b)
        normed = ActivationBatch(columns: c.hiddenSize, capacity: b)
        queries = .allocate(capacity: b * c.queryWidth)
        keys = .allocate(capacity: b * c.kvWidth)
        values = .allocate(capacity: b * c.kvWidth)
        attention = ActivationBatch(columns: c.queryWidth, capacity: b)
        projected = .allocate(capacity: b * c.hiddenSize)
        routerLogits = .allocate(capacity: b * c.expertCount)
        mixture = .allocate(capacity: b * c.hiddenSize)
        partials = .allocate(capacity: max(1, threads) * b * c.hiddenSize)
        gateBuffers = .allocate(capacity: max(1, threads) * max(2 * c.expertFFNSize, b))
        expertInputs = ActivationBatch(columns: c.hiddenSize, capacity: b * c.activeExperts)
        activeIndices = .allocate(capacity: max(1, threads) * c.expertFFNSize)
        scores = .allocate(capacity: max(1, threads) * context)
        ropeTable = RoPETable(headDim: c.headDim, theta: c.ropeTheta)
        ropeAngles = .allocate(capacity: b * c.headDim)
    }

    deinit {
        queries.deallocate(); keys.deallocate(); values.deallocate(); projected.deallocate()
        routerLogits.deallocate(); mixture.deallocate(); partials.deallocate(); gateBuffers.deallocate(); activeIndices.deallocate(); scores.deallocate(); ropeAngles.deallocate()
    }

    public static var defaultThreads: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Forgets the conversation.
    public func reset() { position = 0 }

    /// Runs `tokens` at the next positions. Returns logits (vocab floats per token) for every
    /// token when `allLogits`, else for the last one only.
    public func evaluate(_ tokens: [Int], allLogits: Bool = false) throws(EngineError) -> [Float] {
        let vocab = model.config.vocabSize
        guard !tokens.isEmpty else { throw .invalidRequest("no tokens to evaluate") }
        if let bad = tokens.first(where: { !(0..<vocab).contains($0) }) { throw .invalidToken(id: bad, vocabularySize: vocab) }
        guard position + tokens.count <= contextLength else { throw .contextFull(limit: contextLength) }
        var logits = [Float](repeating: 0, count: (allLogits ? tokens.count : 1) * vocab)
        var start = 0
        while start < tokens.count {
            let batch = Array(tokens[start..<min(start + Session.maximumBatch, tokens.count)])
            forward(batch)
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
    func forward(_ tokens: [Int]) {
        let c = model.config
        let n = tokens.count
        residual.setCount(n)
        for (t, token) in tokens.enumerated() {
            model.embedding.decodeRow(token, into: residual.row(t))
            ropeTable.angles(position: position + t, into: ropeAngles + t * c.headDim)
        }
        for (index, layer) in model.layers.enumerated() {
            // Router first, on the raw residual: the experts are known before attention runs.
            MatMul.multiply(layer.router, residual, into: routerLogits, outputStride: c.expertCount, threads: threads)
            attend(layer: layer, cache: caches[index], count: n)
            mixExperts(layer: layer, index: index, count: n)
        }
        position += n
    }

    /// x += Wo · attention(rmsnorm(x)) for the batch.
    func attend(layer: LayerWeights, cache: KVCache, count n: Int) {
        let c = model.config
        normed.setCount(n)
        for t in 0..<n { rmsNorm(residual.row(t), layer.attentionNorm, into: normed.row(t)) }
        MatMul.multiply([(layer.query, queries, c.queryWidth), (layer.key, keys, c.kvWidth), (layer.value, values, c.kvWidth)],
                        normed, threads: threads)
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
        // One (token, head) pair per task: scores, softmax and the weighted sum of values,
        // streaming over the cache with one score vector per worker.
        let tasks = n * c.attentionHeads
        let workers = max(1, min(threads, tasks, position + n >= 64 || n > 1 ? threads : 1))
        let work = Unchecked((self, cache))
        parallelFor(workers) { worker in
            let (session, cache) = work.value
            let c = session.model.config
            let scores = session.scores + worker * session.contextLength
            let scale = 1 / Float(c.headDim).squareRoot()
            for task in stride(from: worker, to: tasks, by: workers) {
                let t = task / c.attentionHeads, h = task % c.attentionHeads
                let p = session.position + t
                let first = cache.window.map { max(0, p - $0 + 1) } ?? 0
                let kvHead = h / c.groupSize
                let qh = session.queries + t * c.queryWidth + h * c.headDim
                var maxScore = -Float.infinity
                for j in first...p {
                    let s = DotKernels.f32(UnsafeRawPointer(cache.key(position: j) + kvHead * c.headDim), qh, c.headDim) * scale
                    scores[j - first] = s
                    maxScore = max(maxScore, s)
                }
                var sum: Float = 0
                for j in 0...(p - first) {
                    let e = exp(scores[j] - maxScore)
                    scores[j] = e
                    sum += e
                }
                let out = session.attention.row(t) + h * c.headDim
                out.update(repeating: 0, count: c.headDim)
                let inverse = 1 / sum
                for j in first...p {
                    DotKernels.addScaledRow(UnsafeRawPointer(cache.value(position: j) + kvHead * c.headDim), dtype: .f32,
                                            scale: scores[j - first] * inverse, into: out, c.headDim)
                }
            }
        }
        MatMul.multiply(layer.output, attention, into: projected, outputStride: c.hiddenSize, threads: threads)
        for t in 0..<n {
            let x = residual.row(t), y = projected + t * c.hiddenSize
            for i in 0..<c.hiddenSize { x[i] += y[i] }
        }
        residual.setCount(n)
    }

    /// x += Σ weight_e · down_e(relu(gate_e · h) ⊙ (up_e · h)), h = rmsnorm(x), over the chosen experts.
    func mixExperts(layer: LayerWeights, index: Int, count n: Int) {
        let c = model.config
        // Routing (from the logits computed before attention).
        var assigned = [[(token: Int, weight: Float)]](repeating: [], count: c.expertCount)
        for t in 0..<n {
            let logits = routerLogits + t * c.expertCount
            let chosen = (0..<c.expertCount).sorted { logits[$0] > logits[$1] || (logits[$0] == logits[$1] && $0 < $1) }.prefix(c.activeExperts)
            var weights: [Float]
            if c.routerSoftmax {
                let top = logits[chosen.first!]
                weights = chosen.map { exp(logits[$0] - top) }
            } else {
                weights = chosen.map { 1 / (1 + exp(-logits[$0])) }
            }
            let total = weights.reduce(0, +)
            weights = weights.map { $0 / total }
            for (e, w) in zip(chosen, weights) { assigned[e].append((t, w)) }
            routingObserver?(RoutingDecision(layer: index, position: position + t, experts: Array(chosen), weights: weights))
        }

        normed.setCount(n)
        for t in 0..<n { rmsNorm(residual.row(t), layer.ffnNorm, into: normed.row(t)) }
        if layer.experts.contains(where: { $0.gate.dtype.isQuantized || $0.up.dtype.isQuantized }) { _ = normed.quantizedForm() }
        // Each worker takes a slice of every chosen expert's neurons: gate, up and down rows j
        // sit together in the neuron-major bundle. Gate for every token; up and down only where
        // the ReLU lets the neuron through (ReGLU sparsity: a neuron with gate ≤ 0 contributes
        // exactly nothing). Workers add into their own buffer, summed in worker order.
        let ffn = c.expertFFNSize, hidden = c.hiddenSize
        let workers = max(1, min(threads, ffn))
        let quantized = normed.quantized
        // In a batch, each expert's tokens are gathered side by side so that one gate row serves
        // all of them through the many-token kernel (the row is unpacked once).
        var firstRow = [Int](repeating: 0, count: c.expertCount)
        var batched: QuantizedActivations? = nil
        if n > 1, quantized != nil {
            var row = 0
            for (e, tokens) in assigned.enumerated() {
                firstRow[e] = row
                for entry in tokens {
                    expertInputs.row(row).update(from: normed.row(entry.token), count: hidden)
                    row += 1
                }
            }
            expertInputs.setCount(row)
            batched = expertInputs.quantizedForm()
        }
        let work = Unchecked((layer, assigned, partials, normed.floats, quantized?.scales, quantized?.values, quantized?.sums, gateBuffers, activeIndices, batched, firstRow))
        parallelFor(workers) { worker in
            let (layer, assigned, partials, floats, scales, values, sums, gateBuffers, activeIndices, batched, firstRow) = work.value
            let out = partials + worker * Session.maximumBatch * hidden
            out.update(repeating: 0, count: n * hidden)
            let blocks = hidden / 32
            let first = ffn * worker / workers, last = ffn * (worker + 1) / workers
            let activations = gateBuffers + worker * max(2 * ffn, Session.maximumBatch)
            let activeRows = activeIndices + worker * ffn
            for (e, tokens) in assigned.enumerated() where !tokens.isEmpty {
                let expert = layer.experts[e]
                if tokens.count > 1, let batched, expert.gate.dtype.isQuantized {
                    // Row by row: gate for all of the expert's tokens at once, then up and down
                    // for the tokens that activate the neuron, while its rows are in cache.
                    for j in first..<last {
                        DotKernels.quantizedTokens(expert.gate.row(j), dtype: expert.gate.dtype, batched, first: firstRow[e],
                                                   tokens: tokens.count, into: activations, outStride: 1)
                        for (i, entry) in tokens.enumerated() where activations[i] > 0 {
                            let t = entry.token
                            let u = MatMul.dot(expert.up.row(j), expert.up.dtype, floats + t * hidden, scales.map { $0 + t * blocks },
                                               values.map { $0 + t * hidden }, sums.map { $0 + t * blocks }, hidden)
                            DotKernels.addScaledRow(expert.down.row(j), dtype: expert.down.dtype, scale: entry.weight * activations[i] * u,
                                                    into: out + t * hidden, hidden)
                        }
                    }
                    continue
                }
                if expert.gate.dtype == .q4_0 && expert.up.dtype == .q4_0 && expert.down.dtype == .q4_0, let scales, let values, let sums {
                    // The common case, all in C: gate, then up and down for the active neurons.
                    for entry in tokens {
                        st_expert_q4_0(expert.gate.base, expert.up.base, expert.down.base, Int32(expert.gate.rowBytes),
                                       Int32(first), Int32(last), scales + entry.token * blocks, values + entry.token * hidden,
                                       sums + entry.token * blocks, Int32(blocks), entry.weight, out + entry.token * hidden, activations)
                    }
                    continue
                }
                for entry in tokens {
                    let x = floats + entry.token * hidden
                    let xs = scales.map { $0 + entry.token * blocks }, xq = values.map { $0 + entry.token * hidden }
                    let xsum = sums.map { $0 + entry.token * blocks }
                    // Three passes over this worker's rows, each streaming through one matrix:
                    // gate for every neuron, up where the gate is positive, then down.
                    for j in first..<last {
                        activations[j] = MatMul.dot(expert.gate.row(j), expert.gate.dtype, x, xs, xq, xsum, hidden)
                    }
                    // The active neurons, so that each walk can prefetch the next row it needs.
                    var active = 0
                    for j in first..<last where activations[j] > 0 {
                        activeRows[active] = Int32(j)
                        active += 1
                    }
                    for a in 0..<active {
                        let j = Int(activeRows[a])
                        if a + 2 < active { DotKernels.prefetch(expert.up.row(Int(activeRows[a + 2])), bytes: expert.up.rowBytes) }
                        activations[j] *= MatMul.dot(expert.up.row(j), expert.up.dtype, x, xs, xq, xsum, hidden)
                    }
                    let y = out + entry.token * hidden
                    for a in 0..<active {
                        let j = Int(activeRows[a])
                        if a + 2 < active { DotKernels.prefetch(expert.down.row(Int(activeRows[a + 2])), bytes: expert.down.rowBytes) }
                        DotKernels.addScaledRow(expert.down.row(j), dtype: expert.down.dtype, scale: entry.weight * activations[j], into: y, hidden)
                    }
                }
            }
        }
        mixture.update(from: partials, count: n * hidden)
        for worker in 1..<workers {
            let p = partials + worker * Session.maximumBatch * hidden
            for i in 0..<n * hidden { mixture[i] += p[i] }
        }
        for t in 0..<n {
            let x = residual.row(t), y = mixture + t * hidden
            for i in 0..<hidden { x[i] += y[i] }
        }
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
        let n = weight.count
        var sum: Double = 0
        for i in 0..<n { sum += Double(x[i]) * Double(x[i]) }
        let inverse = Float(1 / (sum / Double(n) + model.config.rmsNormEps).squareRoot())
        for i in 0..<n { out[i] = weight[i] * (x[i] * inverse) }
    }
}

/// Keys and values of one layer, float32. Global layers keep every position; sliding-window
/// layers keep the last `window` in a ring.
final class KVCache: @unchecked Sendable {
    let capacity: Int
    let width: Int
    let window: Int?
    let keys: UnsafeMutablePointer<Float>     // (capacity, kv_heads·head_dim)
    let values: UnsafeMutablePointer<Float>   // (capacity, kv_heads·head_dim)

    init(capacity: Int, width: Int, window: Int?) {
        self.capacity = capacity
        self.width = width
        self.window = window
        keys = .allocate(capacity: capacity * width)
        values = .allocate(capacity: capacity * width)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always) func slot(_ position: Int) -> Int { position % capacity }
    @inline(__always) func key(position: Int) -> UnsafeMutablePointer<Float> { keys + slot(position) * width }
    @inline(__always) func value(position: Int) -> UnsafeMutablePointer<Float> { values + slot(position) * width }

    func store(key k: UnsafePointer<Float>, value v: UnsafePointer<Float>, position: Int) {
        key(position: position).update(from: k, count: width)
        value(position: position).update(from: v, count: width)
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
