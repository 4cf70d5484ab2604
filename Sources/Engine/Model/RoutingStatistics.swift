import Format

/// How a model uses its experts over a stretch of text: the facts an expert cache and a prefetch
/// are designed on. Per layer:
/// - expert use: how many routings each expert took, and the share taken by the most used
///   quarter of the experts (0.25 when use is uniform; 1 when a quarter takes everything);
/// - idle neurons: the fraction of a chosen expert's ReGLU neurons whose gate is ≤ 0 (their up
///   and down rows contribute nothing), from the gate rows decoded to float and the expert input
///   in float;
/// - cross-layer prediction: layer L's router applied to layer L−1's input (available one layer
///   early, while layer L−1 computes) against layer L's true choice: how many of the true top k
///   it finds, and how often it finds the true choice of each rank.
///
/// Attach to a session, feed it tokens, read `report`. It observes through the session's hooks
/// and does not change what the session computes.
public final class RoutingStatistics {
    public struct Layer: Sendable {
        public let layer: Int
        /// Routings each expert took (tokens × k in all).
        public let expertCounts: [Int]
        /// Share of this layer's routings taken by the ceil(experts / 4) most used experts.
        public let topQuarterShare: Double
        /// Experts no token chose.
        public let unusedExperts: Int
        /// Fraction of chosen experts' neurons with gate ≤ 0.
        public let idleNeuronFraction: Double
        /// For layers after the first: mean over tokens of |predicted top k ∩ true top k| / k.
        public let predictedRecall: Double?
        /// For layers after the first: for each rank r of the true choice (best first), how often
        /// the prediction contains it.
        public let predictedByRank: [Double]?
    }

    public struct Report: Sendable {
        public let tokens: Int
        public let experts: Int
        public let active: Int
        public let layers: [Layer]
    }

    public let session: Session
    private let config: ModelConfig
    /// Each layer's router decoded to float, (experts, hidden).
    private let routers: [[Float]]
    private var counts: [[Int]]
    private var idle: [Int]
    private var neurons: [Int]
    private var found: [Int]
    private var foundByRank: [[Int]]
    private var predicted: [Int]
    private var tokens = 0
    /// The current batch: each token's choice in the layer being computed, and the previous
    /// layer's input rows.
    private var choices: [Int: [Int]] = [:]
    private var previousInput: [Float] = []
    private var currentInput: [Float] = []
    private var gateRows: [Float] = []

    public init(session: Session) {
        self.session = session
        config = session.model.config
        let c = config
        routers = session.model.layers.map { layer in
            var out = [Float](repeating: 0, count: c.expertCount * c.hiddenSize)
            out.withUnsafeMutableBufferPointer { p in
                for e in 0..<c.expertCount { layer.router.decodeRow(e, into: p.baseAddress! + e * c.hiddenSize) }
            }
            return out
        }
        counts = Array(repeating: Array(repeating: 0, count: c.expertCount), count: c.layerCount)
        idle = Array(repeating: 0, count: c.layerCount)
        neurons = Array(repeating: 0, count: c.layerCount)
        found = Array(repeating: 0, count: c.layerCount)
        foundByRank = Array(repeating: Array(repeating: 0, count: c.activeExperts), count: c.layerCount)
        predicted = Array(repeating: 0, count: c.layerCount)
        attach()
    }

    /// Runs `tokens` through the session from its current position, observing every layer.
    /// Text longer than the session's context is taken in windows: the session is reset when it
    /// fills.
    public func feed(_ ids: [Int]) throws(EngineError) {
        var start = 0
        while start < ids.count {
            if session.position == session.contextLength { session.reset() }
            let take = min(ids.count - start, session.contextLength - session.position)
            _ = try session.evaluate(Array(ids[start..<start + take]))
            start += take
        }
    }

    public var report: Report {
        let c = config
        let quarter = (c.expertCount + 3) / 4
        let layers = (0..<c.layerCount).map { l -> Layer in
            let total = counts[l].reduce(0, +)
            let top = counts[l].sorted(by: >).prefix(quarter).reduce(0, +)
            let n = predicted[l]
            return Layer(
                layer: l, expertCounts: counts[l], topQuarterShare: total > 0 ? Double(top) / Double(total) : 0,
                unusedExperts: counts[l].filter { $0 == 0 }.count,
                idleNeuronFraction: neurons[l] > 0 ? Double(idle[l]) / Double(neurons[l]) : 0,
                predictedRecall: n > 0 ? Double(found[l]) / Double(n * c.activeExperts) : nil,
                predictedByRank: n > 0 ? foundByRank[l].map { Double($0) / Double(n) } : nil)
        }
        return Report(tokens: tokens, experts: c.expertCount, active: c.activeExperts, layers: layers)
    }

    private func attach() {
        session.routingObserver = { [unowned self] decision in
            choices[decision.position] = decision.experts
            for e in decision.experts { counts[decision.layer][e] += 1 }
            if decision.layer == 0 { tokens += 1 }
        }
        session.residualHook = { [unowned self] layer, _, residual in
            guard layer < config.layerCount else { return }
            swap(&previousInput, &currentInput)
            currentInput = Array(residual)
            if layer == 0 { previousInput = [] }
        }
        session.expertInputHook = { [unowned self] layer, rows, input in
            observeExperts(layer: layer, firstPosition: rows[0].position, input: input)
        }
    }

    private func observeExperts(layer l: Int, firstPosition: Int, input: UnsafeBufferPointer<Float>) {
        let c = config, hidden = c.hiddenSize, k = c.activeExperts
        let rows = input.count / hidden
        // Idle neurons: each chosen expert's gate rows decoded once for the batch, then a float
        // dot product per (token, neuron).
        var users = [[Int]](repeating: [], count: c.expertCount)
        for t in 0..<rows { for e in choices[firstPosition + t] ?? [] { users[e].append(t) } }
        for (e, tokens) in users.enumerated() where !tokens.isEmpty {
            let gate = session.model.mappedExperts[l][e].gate
            if gateRows.count < gate.rows * hidden { gateRows = [Float](repeating: 0, count: gate.rows * hidden) }
            gateRows.withUnsafeMutableBufferPointer { g in
                for j in 0..<gate.rows { gate.decodeRow(j, into: g.baseAddress! + j * hidden) }
                for t in tokens {
                    for j in 0..<gate.rows where DotKernels.f32(g.baseAddress! + j * hidden, input.baseAddress! + t * hidden, hidden) <= 0 {
                        idle[l] += 1
                    }
                }
            }
            neurons[l] += gate.rows * tokens.count
        }
        // This layer's router on the previous layer's input.
        guard l > 0, previousInput.count == input.count else { return }
        var logits = [Float](repeating: 0, count: c.expertCount)
        for t in 0..<rows {
            guard let chosen = choices[firstPosition + t] else { continue }
            routers[l].withUnsafeBufferPointer { w in
                previousInput.withUnsafeBufferPointer { x in
                    for e in 0..<c.expertCount {
                        logits[e] = DotKernels.f32(w.baseAddress! + e * hidden, x.baseAddress! + t * hidden, hidden)
                    }
                }
            }
            var guess = [Int](repeating: 0, count: k)
            logits.withUnsafeBufferPointer { l in
                guess.withUnsafeMutableBufferPointer {
                    ExpertAssignments.topK(l.baseAddress!, count: c.expertCount, k: k, into: $0.baseAddress!)
                }
            }
            predicted[l] += 1
            for (rank, e) in chosen.enumerated() where guess.contains(e) {
                found[l] += 1
                foundByRank[l][rank] += 1
            }
        }
    }
}
