import CKernels
import Foundation
import Testing
@testable import Engine

/// The float runtime against the SmallThinker authors' PyTorch outputs (and, for the trained
/// fixture, against Fixtures/trained/smallthinker.py, which matches the authors' code to the
/// bit on the random fixtures), on every kernel tier this CPU has, with a float32 KV cache as
/// theirs (KVCacheTests holds the float16 and q8_0 caches to the definition).
@Suite struct ReferenceLogitsTests {
    static let cases = Reference.models.flatMap { m in ["short", "long"].flatMap { s in [TensorDType.f32, .bf16].map { (m, s, $0) } } }
    static let tiers = DotKernels.InstructionSet.supported

    /// Every layer given the authors' input to it (teacher forcing), as a prompt and token by
    /// token: what it adds to the residual stream is theirs to float rounding (measured: at
    /// most 2e-6 relative on the random fixtures, 4.6e-6 on the trained one), so are the last
    /// layer's normed output and the logits made from it. Router choices within 1e-3 of a tie are
    /// skipped; at most 1% of them may be (the trained fixture has 2 of 700). A wrong layer (RoPE
    /// on a NoPE layer, a window off by one, softmax for sigmoid) is off by more than 1e-2.
    @Test(arguments: Reference.models, tiers)
    func everyLayerMatchesTheReference(model name: String, tier: DotKernels.InstructionSet) throws {
        for dtype in [TensorDType.f32, .bf16] {
            let model = try Model(path: try Packages.path(name, dtype == .bf16 ? nil : dtype))
            let c = model.config, layers = c.layerCount
            for sequence in ["short", "long"] {
                let reference = try #require(try Reference.load(name).sequences[sequence])
                let expected = reference.trace(hidden: c.hiddenSize, active: c.activeExperts)
                for batched in [true, false] {
                    let label = "\(dtype.rawValue) \(sequence) \(batched ? "prompt" : "token by token") on \(tier.name)"
                    let forced = try TeacherForcing.run(
                        model, kernels: tier, tokens: reference.inputIDs, batched: batched,
                        forcing: expected, forcedLayers: layers)
                    let d = TeacherForcing.compare(expected, forced, layers: 0..<layers - 1)
                    let decisions = (layers - 1) * reference.inputIDs.count
                    #expect(
                        d.worst < 1e-4 && d.routingMismatches.isEmpty && d.compared >= decisions - max(1, decisions / 100),
                        "\(label): \(d)")
                    var worstNorm: Float = 0
                    var normed = [Float](repeating: 0, count: c.hiddenSize)
                    for p in 0..<reference.inputIDs.count {
                        let output = Array(forced.state(layers, p))
                        model.outputNorm.withUnsafeBufferPointer { w in
                            _ = st_rms_norm(output, w.baseAddress!, c.rmsNormEps, &normed, Int32(c.hiddenSize))
                        }
                        let theirs = reference.finalNormOut[p * c.hiddenSize..<(p + 1) * c.hiddenSize]
                        worstNorm = max(worstNorm, maxAbsDifference(theirs, normed) / (theirs.map(abs).max()! + 1))
                    }
                    #expect(worstNorm < 1e-4, "\(label): last layer's normed output differs by \(worstNorm)")
                    let logits = TeacherForcing.logitDifference(expected.logits, forced.logits, vocab: c.vocabSize)
                    #expect(logits < 1e-4, "\(label): logits differ by \(logits) of their scale")
                }
            }
        }
    }

    /// Free-running, one token at a time, with the KV cache: the authors' router margins are all
    /// at least 7e-4, far above float rounding, so no choice can tip and the logits stay within
    /// 1e-3 on every tier.
    @Test(arguments: cases, tiers)
    func incrementalLogitsMatchTheReference(
        case: (model: String, sequence: String, dtype: TensorDType), tier: DotKernels.InstructionSet
    ) throws {
        let (model, sequence, dtype) = `case`
        let reference = try #require(try Reference.load(model).sequences[sequence])
        let session = try Session(
            model: try Model(path: try Packages.path(model, dtype == .bf16 ? nil : dtype)), threads: 2, kernels: tier, kvType: .f32)
        let vocab = session.model.config.vocabSize
        var worst: Float = 0
        for (t, token) in reference.inputIDs.enumerated() {
            let logits = try session.evaluate([token])
            worst = max(worst, maxAbsDifference(logits[0..<vocab], reference.logits[t]))
        }
        #expect(worst < 1e-3, "max |logit - reference| = \(worst)")
    }

    @Test(arguments: Reference.models, tiers)
    func batchedPromptMatchesIncrementalDecoding(model: String, tier: DotKernels.InstructionSet) throws {
        let reference = try #require(try Reference.load(model).sequences["long"])
        let m = try Model(path: try Packages.path(model, .f32))
        let batched = try Session(model: m, threads: 2, kernels: tier, kvType: .f32)
        let all = try batched.evaluate(reference.inputIDs, allLogits: true)
        let stepwise = try Session(model: m, threads: 1, kernels: tier, kvType: .f32)
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
        let split = try Session(model: m, threads: 2, kernels: tier, kvType: .f32)
        _ = try split.evaluate(Array(reference.inputIDs[0..<7]))
        let tail = try split.evaluate(Array(reference.inputIDs[7...]), allLogits: true)
        #expect(maxAbsDifference(tail[0..<tail.count], Array(all[7 * vocab..<all.count])) < 1e-3)
    }

    @Test(arguments: Reference.models.flatMap { m in ["short", "long"].map { (m, $0) } }, tiers)
    func routerChoicesMatchTheReference(case: (model: String, sequence: String), tier: DotKernels.InstructionSet) throws {
        let (model, sequence) = `case`
        let reference = try #require(try Reference.load(model).sequences[sequence])
        let session = try Session(model: try Model(path: try Packages.path(model, .f32)), threads: 2, kernels: tier, kvType: .f32)
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
            #expect(
                zip(d.weights, expectedWeights).allSatisfy { abs($0 - $1) < 1e-3 }, "weights at layer \(d.layer) position \(d.position)")
        }
    }

    @Test(arguments: Reference.models.flatMap { m in ["short", "long"].map { (m, $0) } })
    func greedyGenerationReproducesTheReference(model: String, sequence: String) throws {
        let reference = try #require(try Reference.load(model).sequences[sequence])
        let session = try Session(model: try Model(path: try Packages.path(model)), threads: 2, kvType: .f32)
        var logits = try session.evaluate(reference.inputIDs)
        for (step, expected) in reference.greedyTokens.enumerated() {
            let chosen = logits.indices.max { logits[$0] < logits[$1] }!
            if chosen != expected {
                // Only a near-tie may flip, and then the continuation legitimately differs.
                #expect(
                    reference.greedyMargins[step] < 1e-3,
                    "step \(step): chose \(chosen), reference \(expected), margin \(reference.greedyMargins[step])")
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
        #expect(throws: EngineError.invalidToken(id: 512, vocabularySize: 512)) {
            try Session(model: session.model, threads: 1).evaluate([512])
        }
        #expect(throws: EngineError.self) { try Session(model: session.model, contextLength: 100_000) }
    }
}
