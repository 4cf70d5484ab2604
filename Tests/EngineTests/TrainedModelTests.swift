import Foundation
import Format
import Testing
@testable import Engine

/// The trained fixture (Fixtures/trained): what only a model with structure can show. Its
/// reference.json comes from Fixtures/trained/smallthinker.py, which check_reference.py holds to
/// the authors' outputs on the random fixtures.
@Suite struct TrainedModelTests {
    static let model = Reference.trained
    static var json: [String: Any] {
        get throws {
            let data = try Data(contentsOf: URL(fileURLWithPath: Reference.directory(model) + "/reference.json"))
            return try JSONSerialization.jsonObject(with: data) as! [String: Any]
        }
    }

    /// `RoutingStatistics` (what `strun stats` prints) against the same quantities computed by
    /// the PyTorch model on 256 held-out tokens in two windows of 128. Computations that differ
    /// in float rounding may disagree where a router choice or a gate is within rounding of a tie,
    /// so counts are compared to a small tolerance: routings within 1% per layer (a flipped
    /// choice moves two counts by one), idle fractions within 0.002, predictions within 1%.
    @Test(arguments: DotKernels.InstructionSet.supported)
    func routingStatisticsMatchThePyTorchModel(tier: DotKernels.InstructionSet) throws {
        let check = try Self.json["routing_check"] as! [String: Any]
        let ids = check["input_ids"] as! [Int], window = check["window"] as! Int
        let expected = check["layers"] as! [[String: Any]]
        let session = try Session(
            model: try Model(path: try Packages.path(Self.model, .f32)), contextLength: window, threads: 2, kernels: tier)
        let statistics = RoutingStatistics(session: session)
        try statistics.feed(ids)
        let report = statistics.report
        #expect(report.tokens == ids.count && report.layers.count == expected.count)
        for (ours, theirs) in zip(report.layers, expected) {
            let counts = theirs["expert_counts"] as! [Int]
            let moved = zip(ours.expertCounts, counts).map { abs($0 - $1) }.reduce(0, +)
            #expect(ours.expertCounts.reduce(0, +) == counts.reduce(0, +))
            #expect(moved <= 2 * max(1, counts.reduce(0, +) / 100), "layer \(ours.layer): counts \(ours.expertCounts) against \(counts)")
            #expect(abs(ours.topQuarterShare - (theirs["top_quarter_share"] as! Double)) <= 0.01, "layer \(ours.layer)")
            #expect(ours.unusedExperts == theirs["unused_experts"] as! Int || moved > 0, "layer \(ours.layer)")
            #expect(abs(ours.idleNeuronFraction - (theirs["idle_neuron_fraction"] as! Double)) <= 0.002, "layer \(ours.layer)")
            if let recall = theirs["predicted_recall"] as? Double {
                #expect(
                    abs(ours.predictedRecall! - recall) <= 0.01, "layer \(ours.layer): recall \(ours.predictedRecall!) against \(recall)")
                for (a, b) in zip(ours.predictedByRank!, theirs["predicted_by_rank"] as! [Double]) {
                    #expect(abs(a - b) <= 0.02, "layer \(ours.layer)")
                }
            } else {
                #expect(ours.predictedRecall == nil)
            }
        }
    }

    /// Tier against tier on a trained model, for each package type: every layer, given the
    /// portable tier's input to it, adds what it adds on the portable tier to the rounding of
    /// reordered sums (`QuantizedModelTests.reordered`), and free-running over the held-out
    /// passages (which a trained model allows: it is not chaotic) the logits' mean KL from the
    /// portable tier stays below 5e-5 (measured: 1e-12 in float32; 1.2e-6 to 8.2e-6 quantised,
    /// where an activation's Q8_0 rounding can land one step apart) at the positions where both
    /// chose the same experts. A different choice must be a router tie (margin under 0.02; the
    /// logits drift by about 1.5e-3) and leaves its position out, at most one in twenty: in Q4_0
    /// the last layer's margin at one position of 140 is 0.005-0.007, and whether that position
    /// shares its experts' down passes with other tokens of a 32- or a 128-token batch decides
    /// the tie (KL 0.057 there).
    @Test(arguments: [TensorDType.f32, .q8_0, .q4_0])
    func everyTierComputesWhatThePortableTierDoes(type: TensorDType) throws {
        let reference = try Reference.load(Self.model)
        let tokens = reference.sequences["long"]!.inputIDs + reference.sequences["short"]!.inputIDs
        let model = try Model(path: try Packages.path(Self.model, type))
        for tier in DotKernels.InstructionSet.supported where tier != .portable {
            for batched in [true, false] {
                QuantizedModelTests.expect(
                    try TeacherForcing.layerByLayer(
                        base: model, other: model, tokens: tokens, kernels: .portable,
                        batched: batched, otherKernels: tier),
                    within: QuantizedModelTests.reordered, "\(type.rawValue) on \(tier.name), \(batched ? "prompt" : "token by token")")
            }
            let a = try TeacherForcing.run(model, kernels: .portable, tokens: tokens, batched: true)
            let b = try TeacherForcing.run(model, kernels: tier, tokens: tokens, batched: true)
            let free = TeacherForcing.freeRunning(a, b, vocab: model.config.vocabSize, tie: 0.02)
            let name = "\(type.rawValue) on \(tier.name), free-running"
            #expect(free.clearMismatches.isEmpty, "\(name): different experts at clear margins at \(free.clearMismatches.prefix(5))")
            #expect(free.skipped.count * 20 <= tokens.count, "\(name): \(free.skipped.count) positions at router ties")
            #expect(free.logits.meanKL < 5e-5, "\(name): mean KL \(free.logits.meanKL) from the portable tier")
        }
    }

    /// The fixture's tokenizer is the Qwen2 pipeline `Tokenizer` accepts: held-out text, a ChatML
    /// conversation, text unlike the corpus and spelled-out special tokens encode id for id as
    /// Hugging Face `tokenizers` encoded them, and decode back.
    @Test func trainedTokenizerEncodesAsTokenizersDoes() throws {
        let tokenizer = try Tokenizer(path: Reference.directory(Self.model) + "/tokenizer.json")
        #expect(tokenizer.vocabularySize == 4096)
        for sample in try Self.json["tokenizer_check"] as! [[String: Any]] {
            let text = sample["text"] as! String, ids = sample["ids"] as! [Int]
            #expect(tokenizer.encode(text) == ids, "\(text.prefix(40))")
            #expect(try tokenizer.decode(ids) == text.precomposedStringWithCanonicalMapping)
        }
    }
}
