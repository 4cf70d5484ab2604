#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// The router: each layer's router reads the layer's input before attention (SmallThinker's
// pre-attention routing), so the chosen experts are known, and their bundles can be read from
// storage, while attention computes. The test target's ScalarForward.swift defines the whole
// forward pass in plain loops.

/// Which tokens of a batch each expert serves, with their mixture weights. Storage is allocated
/// once per session: routing a token allocates nothing.
final class ExpertAssignments: @unchecked Sendable {
    let experts: Int
    let active: Int
    let batch: Int
    let counts: UnsafeMutablePointer<Int>  // (experts)
    let tokens: UnsafeMutablePointer<Int>  // (experts, batch)
    let weights: UnsafeMutablePointer<Float>  // (experts, batch)
    /// (experts): where expert e's tokens start when the batch's tokens are grouped by expert
    /// (the gathered batch, recorded activations): the counts of the experts before e.
    let firstRow: UnsafeMutablePointer<Int>
    let chosen: UnsafeMutablePointer<Int>  // (active): one token's choice, best first
    let used: UnsafeMutablePointer<Int>  // (experts): the experts any token of the batch chose
    var usedCount = 0
    let chosenWeights: UnsafeMutablePointer<Float>  // (active)

    /// What `init(experts:active:batch:)` allocates.
    static func bytes(experts: Int, active: Int, batch: Int) -> Int {
        MemoryLayout<Int>.stride * (3 * experts + experts * batch + active) + MemoryLayout<Float>.stride * (experts * batch + active)
    }

    init(experts: Int, active: Int, batch: Int) {
        self.experts = experts
        self.active = active
        self.batch = batch
        counts = .allocate(capacity: experts)
        tokens = .allocate(capacity: experts * batch)
        weights = .allocate(capacity: experts * batch)
        firstRow = .allocate(capacity: experts)
        chosen = .allocate(capacity: active)
        used = .allocate(capacity: experts)
        chosenWeights = .allocate(capacity: active)
    }

    deinit {
        counts.deallocate(); tokens.deallocate(); weights.deallocate()
        firstRow.deallocate(); chosen.deallocate(); used.deallocate(); chosenWeights.deallocate()
    }

    /// The `k` largest of `count` logits, best first, the lower index on ties: the routing
    /// choice (and the cross-layer prediction and statistics made the same way).
    static func topK(_ logits: UnsafePointer<Float>, count: Int, k: Int, into chosen: UnsafeMutablePointer<Int>) {
        for r in 0..<k {
            var best = -1
            for e in 0..<count {
                var taken = false
                for i in 0..<r where chosen[i] == e { taken = true; break }
                if !taken && (best < 0 || logits[e] > logits[best]) { best = e }
            }
            chosen[r] = best
        }
    }

    /// Chooses token `t`'s experts from its router logits: the top k by logit (lower index on
    /// ties), weighted by softmax over the chosen logits or by sigmoid normalised over them.
    func route(token t: Int, logits: UnsafePointer<Float>, softmax: Bool) {
        ExpertAssignments.topK(logits, count: experts, k: active, into: chosen)
        var total: Float = 0
        for k in 0..<active {
            let w = softmax ? exp(logits[chosen[k]] - logits[chosen[0]]) : 1 / (1 + exp(-logits[chosen[k]]))
            chosenWeights[k] = w
            total += w
        }
        for k in 0..<active {
            chosenWeights[k] /= total
            let e = chosen[k]
            tokens[e * batch + counts[e]] = t
            weights[e * batch + counts[e]] = chosenWeights[k]
            counts[e] += 1
        }
    }
}

extension Session {
    /// Chooses every token's experts from the router logits (computed before attention).
    func route(layer index: Int, count n: Int) {
        let c = model.config
        let routing = assignments
        routing.counts.update(repeating: 0, count: c.expertCount)
        for t in 0..<n {
            routing.route(token: t, logits: routerLogits + t * c.expertCount, softmax: c.routerSoftmax)
            if let routingObserver {
                let logits = routerLogits + t * c.expertCount
                let chosen = (0..<c.activeExperts).map { routing.chosen[$0] }
                let runnerUp = (0..<c.expertCount).filter { !chosen.contains($0) }.map { logits[$0] }.max() ?? -.infinity
                routingObserver(
                    RoutingDecision(
                        layer: index, sequence: rows[t].sequence, position: rows[t].position, experts: chosen,
                        weights: (0..<c.activeExperts).map { routing.chosenWeights[$0] },
                        margin: logits[chosen[c.activeExperts - 1]] - runnerUp))
            }
        }
        routing.usedCount = 0
        var row = 0
        for e in 0..<c.expertCount {
            routing.firstRow[e] = row
            row += routing.counts[e]
            if routing.counts[e] > 0 {
                routing.used[routing.usedCount] = e
                routing.usedCount += 1
            }
        }
    }
}
