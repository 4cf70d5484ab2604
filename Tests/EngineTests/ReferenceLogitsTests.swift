import Foundation
import Testing
@testable import Engine

/// The float runtime against the SmallThinker authors' PyTorch outputs.
@Suite struct ReferenceLogitsTests {
    static let cases = Reference.models.flatMap { m in ["short", "long"].flatMap { s in [TensorDType.f32, .bf16].map { (m, s, $0) } } }

    @Test(arguments: cases)
    func incrementalLogitsMatchTheReference(model: String, sequence: String, dtype: TensorDType) throws {
        let reference = try #require(try Reference.load(model).sequences[sequence])
        let session = try Session(model: try Model(path: try Packages.path(model, dtype == .bf16 ? nil : dtype)), threads: 2)
        let vocab = session.model.config.vocabSize
        var worst: Float = 0
        for (t, token) in reference.inputIDs.enumerated() {
            let logits = try session.evaluate([token])
            worst = max(worst, maxAbsDifference(logits[0..<vocab], reference.logits[t]))
        }
        #expect(worst < 1e-3, "max |logit - reference| = \(worst)")
    }

    @Test(arguments: Reference.models)
    func batchedPromptMatchesIncrementalDecoding(model: String) throws {
        let reference = try #require(try Reference.load(model).sequences["long"])
        let m = try Model(path: try Packages.path(model, .f32))
        let batched = try Session(model: m, threads: 2)
        let all = try batched.evaluate(reference.inputIDs, allLogits: true)
        let stepwise = try Session(model: m, threads: 1)
        let vocab = m.config.vocabSize
        var worst: Float = 0
        for (t, token) in reference.inputIDs.enumerated() {
            let logits = try stepwise.evaluate([token])
            worst = max(worst, maxAbsDifference(all[t * vocab..<(t + 1) * vocab], logits))
        }
        // Two float computations of the same function (different batching and thread counts sum in
        // different orders); a cache bug shows as errors of order 1.
        #expect(worst < 1e-3, "batched vs one-by-one: \(worst)")
        // Split the prompt unevenly across calls: the cache carries over.
        let split = try Session(model: m, threads: 2)
        _ = try split.evaluate(Array(reference.inputIDs[0..<7]))
        let tail = try split.evaluate(Array(reference.inputIDs[7...]), allLogits: true)
        #expect(maxAbsDifference(tail[0..<tail.count], Array(all[7 * vocab..<all.count])) < 1e-3)
    }

    @Test(arguments: Reference.models.flatMap { m in ["short", "long"].map { (m, $0) } })
    func routerChoicesMatchTheReference(model: String, sequence: String) throws {
        let reference = try #require(try Reference.load(model).sequences[sequence])
        let session = try Session(model: try Model(path: try Packages.path(model, .f32)), threads: 2)
        var decisions: [RoutingDecision] = []
        session.routingObserver = { decisions.append($0) }
        _ = try session.evaluate(reference.inputIDs)
        let layers = session.model.config.layerCount
        #expect(decisions.count == layers * reference.inputIDs.count)
        for d in decisions {
            #expect(d.experts == reference.topkExperts[d.layer][d.position], "layer \(d.layer) position \(d.position)")
            let expectedWeights = reference.topkWeights[d.layer][d.position]
            // Float noise reaches 1.3e-4 in tiny-21b-like's last layers (its residual grows to
            // |x| ≈ 45); a wrong routing function (softmax vs sigmoid, unnormalised) is off by > 1e-2.
            #expect(zip(d.weights, expectedWeights).allSatisfy { abs($0 - $1) < 1e-3 }, "weights at layer \(d.layer) position \(d.position)")
        }
    }

    @Test(arguments: Reference.models.flatMap { m in ["short", "long"].map { (m, $0) } })
    func greedyGenerationReproducesTheReference(model: String, sequence: String) throws {
        let reference = try #require(try Reference.load(model).sequences[sequence])
        let session = try Session(model: try Model(path: try Packages.path(model)), threads: 2)
        var logits = try session.evaluate(reference.inputIDs)
        for (step, expected) in reference.greedyTokens.enumerated() {
            let chosen = logits.indices.max { logits[$0] < logits[$1] }!
            if chosen != expected {
                // Only a near-tie may flip, and then the continuation legitimately differs.
                #expect(reference.greedyMargins[step] < 1e-3, "step \(step): chose \(chosen), reference \(expected), margin \(reference.greedyMargins[step])")
                return
            }
            #expect(maxAbsDifference(logits[0..<logits.count], reference.greedyStepLogits[step]) < 1e-3, "step \(step)")
            logits = try session.evaluate([chosen])
        }
    }

    @Test func contextLimitIsEnforced() throws {
        let session = try Session(model: try Model(path: try Packages.path("tiny-4b-like")), contextLength: 5, threads: 1)
        _ = try session.evaluate([1, 2, 3, 4])
        #expect(throws: EngineError.contextFull(limit: 5)) { try session.evaluate([5, 6]) }
        _ = try session.evaluate([5])
        #expect(throws: EngineError.contextFull(limit: 5)) { try session.evaluate([6]) }
        session.reset()
        _ = try session.evaluate([1, 2, 3, 4, 5])
        #expect(throws: EngineError.invalidToken(id: 512, vocabularySize: 512)) { try Session(model: session.model, threads: 1).evaluate([512]) }
        #expect(throws: EngineError.self) { try Session(model: session.model, contextLength: 100_000) }
    }
}
