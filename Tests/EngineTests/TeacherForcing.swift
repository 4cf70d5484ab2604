import Foundation
import Testing
@testable import Engine

/// Teacher-forced, layer-by-layer comparison of two computations of the same model.
///
/// The random-weight fixtures are chaotic: a float-rounding difference in one layer can tip a
/// router near-tie, and a different expert choice persists through the KV cache, so comparing
/// free-running logits of two computations that sum in different orders says more about the
/// fixture than about the code. Instead the second computation is given, at every layer, the
/// first one's input to that layer (every position), and what each layer adds to the residual
/// stream is compared. Attention at a position reads only that layer's inputs (forced), so an
/// error stays where it is made; a router choice closer to a tie than `tie` in either run is the
/// one place a rounding difference may legitimately change the result, and is skipped (and
/// counted).
struct Trace {
    let hidden: Int
    /// (layers + 1) × (positions · hidden): the residual stream entering each layer, then the
    /// last layer's output. Forced runs record, at l + 1, what layer l made of its given input.
    var states: [[Float]]
    /// layers × positions: the router's k-th minus (k+1)-th logit.
    var margins: [[Float]]
    /// layers × positions: the chosen experts, best first.
    var experts: [[[Int]]]
    /// positions × vocab.
    var logits: [Float]

    var layers: Int { margins.count }
    var positions: Int { margins.first?.count ?? 0 }

    func state(_ layer: Int, _ position: Int) -> ArraySlice<Float> {
        states[layer][position * hidden..<(position + 1) * hidden]
    }
}

enum TeacherForcing {
    /// Runs `tokens` through a new session on `model` with the `kernels` tier, as one prompt
    /// (`batched`) or one token per call (decoding), and records its trace. The KV cache is
    /// float32 unless `kvType` says otherwise: comparisons of two computations are about their
    /// arithmetic, which a smaller cache's rounding would amplify (a value a rounding apart can be
    /// stored a float16 step apart); KVCacheTests holds the other types to the definition. With `inputs`, each
    /// layer l < `forcedLayers` (default: every layer and the final stream) gets
    /// `inputs.states[l]` as its input.
    static func run(
        _ model: Model, kernels: DotKernels.InstructionSet, tokens: [Int], batched: Bool, forcing inputs: Trace? = nil,
        forcedLayers: Int? = nil, threads: Int = 2, memoryBudget: Int? = nil, kvType: KVCacheType = .f32
    ) throws -> Trace {
        let n = tokens.count
        let session = try Session(
            model: model, contextLength: max(n, 64), threads: threads, memoryBudget: memoryBudget, kernels: kernels, kvType: kvType)
        defer { session.expertCache?.shutdown() }
        let recorder = Recorder(session, lengths: [n], forcing: inputs.map { [$0] }, forcedLayers: forcedLayers)
        if batched {
            recorder.traces[0].logits = try session.evaluate(tokens, allLogits: true)
        } else {
            for t in tokens { recorder.traces[0].logits += try session.evaluate([t]) }
        }
        return recorder.traces[0]
    }

    /// Several sequences through one session (`sequences: tokens.count`), in `steps`: each step
    /// one forward batch, a list of (sequence, how many of its next tokens), every position's
    /// logits kept. With `inputs`, each row of every layer gets its sequence's `inputs` state.
    /// Returns a trace per sequence.
    static func runTogether(
        _ model: Model, kernels: DotKernels.InstructionSet, tokens: [[Int]], steps: [[(sequence: Int, count: Int)]],
        forcing inputs: [Trace]? = nil, threads: Int = 2, memoryBudget: Int? = nil
    ) throws -> [Trace] {
        let vocab = model.config.vocabSize
        let session = try Session(
            model: model, contextLength: max(tokens.map(\.count).max()!, 64), threads: threads, memoryBudget: memoryBudget,
            kernels: kernels, sequences: tokens.count, kvType: .f32)
        defer { session.expertCache?.shutdown() }
        let recorder = Recorder(session, lengths: tokens.map(\.count), forcing: inputs, forcedLayers: nil)
        for (s, t) in tokens.enumerated() { recorder.traces[s].logits = [Float](repeating: .nan, count: t.count * vocab) }
        var fed = [Int](repeating: 0, count: tokens.count)
        for step in steps {
            let chunks = step.map {
                SequenceChunk(
                    sequence: $0.sequence, tokens: Array(tokens[$0.sequence][fed[$0.sequence]..<fed[$0.sequence] + $0.count]), logits: .all)
            }
            let logits = try session.evaluate(chunks)
            var row = 0
            for (s, count) in step {
                for i in 0..<count {
                    let p = fed[s] + i
                    recorder.traces[s].logits.replaceSubrange(
                        p * vocab..<(p + 1) * vocab, with: logits[(row + i) * vocab..<(row + i + 1) * vocab])
                }
                row += count
                fed[s] += count
            }
        }
        return recorder.traces
    }

    /// Records each sequence's trace from a session's hooks and, with `inputs`, overwrites each
    /// row's layer input with its sequence's recorded one (layers below `forcedLayers`; default
    /// every layer and the final stream).
    final class Recorder {
        var traces: [Trace]

        init(_ session: Session, lengths: [Int], forcing inputs: [Trace]?, forcedLayers: Int?) {
            let c = session.model.config, hidden = c.hiddenSize
            traces = lengths.map { n in
                Trace(
                    hidden: hidden, states: Array(repeating: [Float](repeating: .nan, count: n * hidden), count: c.layerCount + 1),
                    margins: Array(repeating: [Float](repeating: .nan, count: n), count: c.layerCount),
                    experts: Array(repeating: Array(repeating: [], count: n), count: c.layerCount), logits: [])
            }
            let forced = forcedLayers ?? c.layerCount + 1
            session.routingObserver = { [unowned self] d in
                traces[d.sequence].margins[d.layer][d.position] = d.margin
                traces[d.sequence].experts[d.layer][d.position] = d.experts
            }
            session.residualHook = { [unowned self] layer, rows, residual in
                for i in 0..<residual.count / hidden {
                    let s = rows[i].sequence, p = rows[i].position
                    for j in 0..<hidden { traces[s].states[layer][p * hidden + j] = residual[i * hidden + j] }
                    if let inputs, layer < forced {
                        for j in 0..<hidden { residual[i * hidden + j] = inputs[s].states[layer][p * hidden + j] }
                    }
                }
            }
        }
    }

    /// The worst relative difference, over layers and positions, between what each layer adds
    /// in `forced` (run on `expected`'s inputs) and in `expected`: |Δf − Δe| / |Δe| with
    /// Δ = output − input. Positions where either run's router is within `tie` of a tie are left
    /// out; where both are clear the experts must agree.
    struct Difference: CustomStringConvertible {
        var worst: Float = 0
        var worstAt = (layer: 0, position: 0)
        /// The mean of the compared positions' relative differences.
        var mean: Float = 0
        var compared = 0
        var skipped = 0
        var routingMismatches: [(layer: Int, position: Int)] = []
        var description: String {
            "worst relative difference \(worst) (mean \(mean)) at layer \(worstAt.layer) position \(worstAt.position); \(compared) "
                + "compared, \(skipped) near router ties skipped"
                + (routingMismatches.isEmpty ? "" : "; different experts despite clear margins at \(routingMismatches.prefix(5))")
        }
    }

    static func compare(_ expected: Trace, _ forced: Trace, tie: Float = 1e-3, layers: Range<Int>? = nil) -> Difference {
        var result = Difference()
        for l in layers ?? 0..<expected.layers {
            for p in 0..<expected.positions {
                guard expected.margins[l][p] > tie, forced.margins[l][p] > tie else { result.skipped += 1; continue }
                if Set(expected.experts[l][p]) != Set(forced.experts[l][p]) { result.routingMismatches.append((l, p)) }
                let input = expected.state(l, p), e = expected.state(l + 1, p), f = forced.state(l + 1, p)
                var error: Double = 0, size: Double = 0
                for (x, (a, b)) in zip(input, zip(e, f)) {
                    error += Double(b - a) * Double(b - a)
                    size += Double(a - x) * Double(a - x)
                }
                let relative = Float((error / max(size, 1e-30)).squareRoot())
                result.compared += 1
                result.mean += relative
                if !(relative <= result.worst) { result.worst = relative; result.worstAt = (l, p) }
            }
        }
        result.mean /= Float(max(1, result.compared))
        return result
    }

    /// `other` given `base`'s layer inputs, both on `kernels`: each run batched (a prompt) or
    /// token by token as asked. Returns the per-layer difference and the logits' comparison
    /// (both made from the same final residual stream).
    /// `otherKernels`: the second computation's tier, when it is not `kernels`.
    static func layerByLayer(
        base: Model, other: Model, tokens: [Int], kernels: DotKernels.InstructionSet, batched: Bool,
        baseBatched: Bool? = nil, tie: Float = 1e-3, memoryBudget: Int? = nil,
        otherKernels: DotKernels.InstructionSet? = nil
    ) throws -> (layers: Difference, logits: LogitComparison) {
        let expected = try run(base, kernels: kernels, tokens: tokens, batched: baseBatched ?? batched)
        let forced = try run(
            other, kernels: otherKernels ?? kernels, tokens: tokens, batched: batched, forcing: expected, memoryBudget: memoryBudget)
        return (
            compare(expected, forced, tie: tie),
            LogitComparison(base: expected.logits, other: forced.logits, vocab: base.config.vocabSize, tokens: tokens)
        )
    }

    /// Two free-running runs' logits (no forcing), compared at the positions where every layer
    /// chose the same experts in both. A different choice is allowed only at a router tie (margin
    /// under `tie` in either run: free-running streams drift apart by rounding through the layers
    /// before, so the tie is wider than a forced run's) and takes its position out of the
    /// comparison; a different choice at a clear margin is reported. (KL and top-1 only: the kept
    /// positions are not a sequence, so the perplexities mean nothing.)
    static func freeRunning(
        _ a: Trace, _ b: Trace, vocab: Int, tie: Float
    ) -> (
        logits: LogitComparison, skipped: [Int], clearMismatches: [(layer: Int, position: Int)]
    ) {
        var skipped: Set<Int> = [], clear: [(layer: Int, position: Int)] = []
        for l in 0..<a.layers {
            for p in 0..<a.positions where Set(a.experts[l][p]) != Set(b.experts[l][p]) {
                if min(a.margins[l][p], b.margins[l][p]) < tie { skipped.insert(p) } else { clear.append((l, p)) }
            }
        }
        let kept = (0..<a.positions).filter { !skipped.contains($0) }
        let rows = { (x: [Float]) in kept.flatMap { x[$0 * vocab..<($0 + 1) * vocab] } }
        return (LogitComparison(base: rows(a.logits), other: rows(b.logits), vocab: vocab, tokens: []), skipped.sorted(), clear)
    }

    /// The largest |a − b| over positions' logits, relative to the position's largest |logit|
    /// (plus 1), for logits computed from the same final residual stream.
    static func logitDifference(_ a: [Float], _ b: [Float], vocab: Int) -> Float {
        var worst: Float = 0
        for p in 0..<a.count / vocab {
            let u = a[p * vocab..<(p + 1) * vocab], v = b[p * vocab..<(p + 1) * vocab]
            let scale = u.map(abs).max()! + 1
            worst = max(worst, zip(u, v).map { abs($0 - $1) }.max()! / scale)
        }
        return worst
    }
}
