import Foundation
@testable import Engine

/// The SmallThinker forward pass in plain loops, llama2.c style: the readable definition of the
/// model, and the oracle the runtime's fast path is tested against (every matrix decoded to
/// float, every sum in double, one position at a time, nothing cached but keys and values).
///
/// Per layer, for the residual stream x of one position:
///   router logits r = W_router · x (on the layer's input, before attention); the top k experts
///   by r (lower index on ties), weighted softmax(r_chosen) or sigmoid(r_chosen) / Σ sigmoid
///   h = rmsnorm(x) ⊙ attention_norm;  q, k, v = W_q h, W_k h, W_v h
///   RoPE layers rotate q and k in halves (pairs i, i + d/2) by p · θ^(−2i/d); NoPE layers do not
///   x += W_o · concat_heads(softmax_j(q·k_j / √d) · v_j), j over the positions the layer sees
///        (all before and at p; sliding-window layers the last `window`), kv head = head / group
///   h = rmsnorm(x) ⊙ ffn_norm;  x += Σ_e w_e · W_down,e (relu(W_gate,e h) ⊙ (W_up,e h))
/// then logits = W_output · (rmsnorm(x) ⊙ output_norm), W_output the embedding when tied.
/// Keys and values are cached as `kvType` holds them: each head's key (after RoPE) and value
/// rounded to float32, then stored and read back in that type's codec (float16, or ggml's q8_0
/// blocks per head).
struct ScalarForward {
    let c: ModelConfig
    var kvType: KVCacheType = .f32
    let embedding: [Float], outputNorm: [Float], output: [Float]  // (vocab, hidden), (hidden), (vocab, hidden)
    struct Layer {
        let attentionNorm: [Float], ffnNorm: [Float]  // (hidden)
        let query: [Float], key: [Float], value: [Float]  // (q width | kv width, hidden)
        let attentionOutput: [Float]  // (hidden, q width)
        let router: [Float]  // (experts, hidden)
        let gate: [[Float]], up: [[Float]]  // experts × (ffn, hidden)
        let down: [[Float]]  // experts × (ffn, hidden): neuron-major, as stored
    }
    let layers: [Layer]

    init(package: PackageReader, kvType: KVCacheType = .f32) {
        let c = package.manifest.config
        self.c = c
        self.kvType = kvType
        func load(_ name: String) -> [Float] {
            let t = package.tensor(name)!
            var v = [Float](repeating: 0, count: t.elementCount)
            v.withUnsafeMutableBufferPointer { package.decode(t, into: $0.baseAddress!) }
            return v
        }
        embedding = load(TensorNames.embedding)
        outputNorm = load(TensorNames.outputNorm)
        output = c.tieWordEmbeddings ? embedding : load(TensorNames.output)
        layers = (0..<c.layerCount).map { n in
            Layer(
                attentionNorm: load(TensorNames.attentionNorm(n)), ffnNorm: load(TensorNames.ffnNorm(n)),
                query: load(TensorNames.query(n)), key: load(TensorNames.key(n)), value: load(TensorNames.value(n)),
                attentionOutput: load(TensorNames.attentionOutput(n)), router: load(TensorNames.router(n)),
                gate: (0..<c.expertCount).map { load(TensorNames.expertGate(n, $0)) },
                up: (0..<c.expertCount).map { load(TensorNames.expertUp(n, $0)) },
                down: (0..<c.expertCount).map { load(TensorNames.expertDown(n, $0)) })
        }
    }

    /// `v` (kv width) as the KV cache holds it, head by head.
    func cached(_ v: [Double]) -> [Double] {
        let dtype: TensorDType
        switch kvType {
        case .f32: return v.map { Double(Float($0)) }
        case .f16: dtype = .f16
        case .q8_0: dtype = .q8_0
        }
        var out: [Double] = []
        for head in 0..<c.kvHeads {
            let x = v[head * c.headDim..<(head + 1) * c.headDim].map { Float($0) }
            var bytes = [UInt8](repeating: 0, count: dtype.byteLength(shape: [c.headDim])!)
            var back = [Float](repeating: 0, count: c.headDim)
            x.withUnsafeBufferPointer { x in
                bytes.withUnsafeMutableBytes { b in
                    _ = TensorCodec.encode(x.baseAddress!, count: c.headDim, as: dtype, into: b.baseAddress!)
                    TensorCodec.decode(b.baseAddress!, dtype: dtype, count: c.headDim, into: &back)
                }
            }
            out += back.map(Double.init)
        }
        return out
    }

    /// y = W x for W (rows, columns) row-major, in double.
    func matmul(_ w: [Float], _ x: [Double], rows: Int) -> [Double] {
        let n = x.count
        return w.withUnsafeBufferPointer { w in
            (0..<rows).map { r in
                var s = 0.0
                for i in 0..<n { s += Double(w[r * n + i]) * x[i] }
                return s
            }
        }
    }

    func rmsNorm(_ x: [Double], _ weight: [Float]) -> [Double] {
        let r = 1 / (x.reduce(0) { $0 + $1 * $1 } / Double(x.count) + c.rmsNormEps).squareRoot()
        return zip(x, weight).map { Double($1) * ($0 * r) }
    }

    func rotate(_ v: inout [Double], at offset: Int, position p: Int) {
        let half = c.headDim / 2
        for i in 0..<half {
            let angle = Double(p) * pow(c.ropeTheta, -2 * Double(i) / Double(c.headDim))
            let a = v[offset + i], b = v[offset + i + half]
            v[offset + i] = a * cos(angle) - b * sin(angle)
            v[offset + i + half] = b * cos(angle) + a * sin(angle)
        }
    }

    /// A weight matrix's input, for `run`'s observer.
    enum MatrixInput {
        /// What W_q, W_k and W_v multiply; what W_o multiplies.
        case attention, attentionOutput
        /// What expert e's gate and up multiply; what its down multiplies (relu(gate) ⊙ up).
        case expert(Int), activations(Int)
        /// What the output matrix multiplies (layer is the layer count).
        case final
    }

    /// Runs `tokens` from position 0 and returns the trace `TeacherForcing.compare` reads: the
    /// residual stream entering each layer and leaving the last, router margins and choices, logits.
    /// `observe`, when given, sees every weight matrix's input.
    func run(_ tokens: [Int], observe: ((_ layer: Int, _ input: MatrixInput, _ values: [Double]) -> Void)? = nil) -> Trace {
        let hidden = c.hiddenSize, d = c.headDim, k = c.activeExperts
        var trace = Trace(
            hidden: hidden, states: Array(repeating: [], count: c.layerCount + 1),
            margins: Array(repeating: [], count: c.layerCount), experts: Array(repeating: [], count: c.layerCount), logits: [])
        var keys = Array(repeating: [[Double]](), count: c.layerCount), values = keys  // layer × position × kv width
        for (p, token) in tokens.enumerated() {
            var x = (0..<hidden).map { Double(embedding[token * hidden + $0]) }
            for (n, layer) in layers.enumerated() {
                trace.states[n] += x.map(Float.init)
                let logits = matmul(layer.router, x, rows: c.expertCount)
                var chosen: [Int] = []
                for _ in 0..<k {
                    chosen.append(
                        (0..<c.expertCount).filter { !chosen.contains($0) }.max {
                            logits[$0] < logits[$1] || (logits[$0] == logits[$1] && $0 > $1)
                        }!)
                }
                let runnerUp = (0..<c.expertCount).filter { !chosen.contains($0) }.map { logits[$0] }.max() ?? -.infinity
                trace.margins[n].append(Float(logits[chosen[k - 1]] - runnerUp))
                trace.experts[n].append(chosen)
                let raw = chosen.map { c.routerSoftmax ? exp(logits[$0] - logits[chosen[0]]) : 1 / (1 + exp(-logits[$0])) }
                let weights = raw.map { $0 / raw.reduce(0, +) }

                let h = rmsNorm(x, layer.attentionNorm)
                observe?(n, .attention, h)
                var q = matmul(layer.query, h, rows: c.queryWidth), key = matmul(layer.key, h, rows: c.kvWidth)
                if c.ropeLayout[n] {
                    for head in 0..<c.attentionHeads { rotate(&q, at: head * d, position: p) }
                    for head in 0..<c.kvHeads { rotate(&key, at: head * d, position: p) }
                }
                keys[n].append(cached(key))
                values[n].append(cached(matmul(layer.value, h, rows: c.kvWidth)))
                let first = c.slidingWindowLayout[n] ? max(0, p - c.slidingWindowSize + 1) : 0
                var attended = [Double](repeating: 0, count: c.queryWidth)
                for head in 0..<c.attentionHeads {
                    let kv = head / c.groupSize
                    let scores = (first...p).map { j in
                        (0..<d).reduce(0.0) { $0 + q[head * d + $1] * keys[n][j][kv * d + $1] } / Double(d).squareRoot()
                    }
                    let top = scores.max()!, e = scores.map { exp($0 - top) }, total = e.reduce(0, +)
                    for (i, j) in (first...p).enumerated() {
                        for t in 0..<d { attended[head * d + t] += e[i] / total * values[n][j][kv * d + t] }
                    }
                }
                observe?(n, .attentionOutput, attended)
                x = zip(x, matmul(layer.attentionOutput, attended, rows: hidden)).map(+)

                let f = rmsNorm(x, layer.ffnNorm)
                for (e, w) in zip(chosen, weights) {
                    let gate = matmul(layer.gate[e], f, rows: c.expertFFNSize), up = matmul(layer.up[e], f, rows: c.expertFFNSize)
                    observe?(n, .expert(e), f)
                    observe?(n, .activations(e), (0..<c.expertFFNSize).map { gate[$0] > 0 ? gate[$0] * up[$0] : 0 })
                    for j in 0..<c.expertFFNSize where gate[j] > 0 {
                        let a = w * gate[j] * up[j]
                        for i in 0..<hidden { x[i] += a * Double(layer.down[e][j * hidden + i]) }
                    }
                }
            }
            trace.states[c.layerCount] += x.map(Float.init)
            let final = rmsNorm(x, outputNorm)
            observe?(c.layerCount, .final, final)
            trace.logits += matmul(output, final, rows: c.vocabSize).map(Float.init)
        }
        return trace
    }
}
