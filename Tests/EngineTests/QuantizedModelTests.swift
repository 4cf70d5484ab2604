import Foundation
import Format
import Testing
@testable import Engine

/// Quantised packages judged against the float32 package of the same checkpoint, and the
/// quantised paths against each other, over the fixtures' long and short sequences back to back
/// (64 positions), on every kernel tier this CPU has.
///
/// The fixtures are random-weight models and chaotic: a rounding difference of one float ulp can
/// tip a router near-tie, and the changed choice persists through the KV cache, so free-running
/// logits of two computations say more about the fixture than the code (Q4_0 against float32
/// measured a free-running mean KL of 2.6–5.5 but 0.02–0.05 layer by layer). Every comparison
/// here is teacher-forced (`TeacherForcing`): each layer of the second computation gets the
/// first one's input to it, and what the layers add to the residual stream, and the logits made
/// from the same final stream, are compared. The bounds are 1.5x the largest value measured over
/// the three fixtures and three tiers (which agree to three digits) when they were written:
///
/// | against float32 | mean / worst relative layer difference | logits' mean KL |
/// |---|---|---|
/// | q8_0 | 0.0197 / 0.061 | 4.1e-4 |
/// | q4_0 | 0.212 / 0.62 | 0.047 |
@Suite struct QuantizedModelTests {
    static let tiers = DotKernels.InstructionSet.supported
    static let bounds: [TensorDType: (mean: Float, worst: Float, kl: Double)] = [
        .q8_0: (0.030, 0.092, 6.2e-4),
        .q4_0: (0.32, 0.93, 0.071)
    ]
    /// The trained fixture, measured the same way (all three tiers agree to four digits): q8_0
    /// 0.00497 / 0.0204 and a KL of 3.9e-5; q4_0 0.0469 / 0.131 and 4.8e-3. Four bits cost a
    /// trained model a quarter of the layer difference and a tenth of the KL they cost the random
    /// fixtures. The bounds are 1.5x those values.
    static let trainedBounds: [TensorDType: (mean: Float, worst: Float, kl: Double)] = [
        .q8_0: (0.0075, 0.031, 5.9e-5),
        .q4_0: (0.070, 0.196, 7.2e-3)
    ]
    static func bounds(_ model: String) -> [TensorDType: (mean: Float, worst: Float, kl: Double)] {
        model == Reference.trained ? trainedBounds : bounds
    }
    /// Two computations of the same blocks that differ only in the order of float additions:
    /// measured at most 1.6e-6 relative, except where a sum lands on the other side of a Q8_0
    /// activation rounding boundary and the value moves by a whole step (measured once: 1.7e-3
    /// at one position of 512, mean 3.6e-6). A wrong path differs by more than 0.1.
    static let reordered = (mean: Float(1e-4), worst: Float(0.02), kl: 1e-5)

    static func tokens(_ model: String) throws -> [Int] {
        let reference = try Reference.load(model)
        return reference.sequences["long"]!.inputIDs + reference.sequences["short"]!.inputIDs
    }

    /// Expects `result` within `bound`; `label` names the comparison.
    static func expect(
        _ result: (layers: TeacherForcing.Difference, logits: LogitComparison), within bound: (mean: Float, worst: Float, kl: Double),
        _ label: String, sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let d = result.layers
        #expect(
            d.mean <= bound.mean && d.worst <= bound.worst && d.routingMismatches.isEmpty
                && d.compared >= 9 * (d.compared + d.skipped) / 10,
            "\(label): \(d)", sourceLocation: sourceLocation)
        #expect(result.logits.meanKL <= bound.kl, "\(label): logits' mean KL \(result.logits.meanKL)", sourceLocation: sourceLocation)
    }

    @Test(arguments: Reference.models, tiers)
    func quantisedModelsStayWithinMeasuredBoundsAndQ8BeatsQ4(model: String, tier: DotKernels.InstructionSet) throws {
        let tokens = try Self.tokens(model)
        let base = try Model(path: try Packages.path(model, .f32))
        var means: [TensorDType: Float] = [:]
        for type in [TensorDType.q8_0, .q4_0] {
            let quantised = try Model(path: try Packages.path(model, type))
            let result = try TeacherForcing.layerByLayer(base: base, other: quantised, tokens: tokens, kernels: tier, batched: true)
            Self.expect(result, within: Self.bounds(model)[type]!, "\(model) \(type.rawValue) on \(tier.name)")
            #expect(result.logits.positions == tokens.count)
            means[type] = result.layers.mean
        }
        #expect(means[.q8_0]! < means[.q4_0]! / 5, "eight bits are much closer than four: \(means)")
    }

    /// Eight-row groups change only the order of float additions. Three ways to run the same
    /// Q4_0 blocks: a package stored `row_major_x8` (stquant's default), a `--plain-rows` package
    /// arranged at load, and the plain package read in place with the one-row kernels. The first
    /// two are the same computation where their layouts agree, so their logits are identical bit
    /// for bit (where the stored up rows are `row_major_b8`, they agree to `reordered`). Against the third:
    /// every arranged dense matrix gives the in-place product to float rounding, embedding rows
    /// read from the arranged head are the stored ones, and every layer, as a prompt and token
    /// by token, adds what the in-place one adds to the stated rounding (`reordered`).
    @Test(arguments: Reference.models, tiers)
    func groupedRowsGiveThePlainRowResults(model: String, tier: DotKernels.InstructionSet) throws {
        let tokens = try Self.tokens(model)
        let plainPath = try Packages.path(model, .q4_0, plainRows: true)
        let stored = try Model(path: try Packages.path(model, .q4_0))
        let arranged = try Model(path: plainPath), inPlace = try Model(path: plainPath, copyHotMatrices: false)
        // stquant stores up rows with their blocks grouped in eights (row_major_b8) where the
        // hidden size is a multiple of 256 (the trained fixture); arranging at load makes
        // eight-row groups of them.
        let storedUp: TensorLayout = stored.config.hiddenSize % 256 == 0 ? .rowMajorB8 : .rowMajorX8
        for (m, up) in [(stored, storedUp), (arranged, TensorLayout.rowMajorX8)] {
            #expect(m.layers[0].query.layout == .rowMajorX8 && m.output.layout == .rowMajorX8)
            #expect(m.layers[0].experts[0].gate.layout == .rowMajorX8 && m.layers[0].experts[0].up.layout == up)
            #expect(m.layers[0].experts[0].down.layout == .rowMajor)
        }
        #expect(inPlace.layers[0].query.layout == .rowMajor && inPlace.layers[0].experts[0].gate.layout == .rowMajor)
        let hidden = stored.config.hiddenSize
        for token in [0, 1, 7, 8, 9, stored.config.vocabSize - 1] {
            var a = [Float](repeating: 0, count: hidden), b = a
            stored.embedding.decodeRow(token, into: &a)
            inPlace.embedding.decodeRow(token, into: &b)
            #expect(a == b, "embedding row \(token)")
        }
        // Every dense matrix, 1 and 5 activation rows.
        var g = KernelTests.Generator(state: 3)
        for count in [1, 5] {
            let x = ActivationBatch(columns: hidden, capacity: count)
            x.setCount(count)
            for t in 0..<count { for i in 0..<hidden { x.row(t)[i] = g.next() * 2 } }
            var pairs = [(stored.output, inPlace.output)]
            for (a, b) in zip(stored.layers, inPlace.layers) { pairs += [(a.query, b.query), (a.key, b.key), (a.value, b.value)] }
            for (a, b) in pairs {
                var y = [Float](repeating: 0, count: a.rows * count), z = y
                DotKernels.with(tier) {
                    MatMul.multiply(a, x, into: &y, outputStride: a.rows, threads: 2)
                    MatMul.multiply(b, x, into: &z, outputStride: b.rows, threads: 2)
                }
                let worst = zip(y, z).map { abs($0 - $1) }.max()!, scale = z.map(abs).max()!
                #expect(worst <= 1e-5 * scale, "\(a.name), \(count) rows on \(tier.name): difference \(worst) in values up to \(scale)")
            }
        }
        for batched in [true, false] {
            let a = try TeacherForcing.run(stored, kernels: tier, tokens: tokens, batched: batched)
            let b = try TeacherForcing.run(arranged, kernels: tier, tokens: tokens, batched: batched)
            if storedUp == .rowMajorX8 {
                #expect(a.logits == b.logits && a.states == b.states, "stored groups and groups made at load must agree bit for bit")
            } else {
                Self.expect(
                    try TeacherForcing.layerByLayer(base: arranged, other: stored, tokens: tokens, kernels: tier, batched: batched),
                    within: Self.reordered, "b8 against x8 up rows, \(batched ? "prompt" : "token by token") on \(tier.name)")
            }
            Self.expect(
                try TeacherForcing.layerByLayer(base: inPlace, other: stored, tokens: tokens, kernels: tier, batched: batched),
                within: Self.reordered, "\(batched ? "prompt" : "token by token") on \(tier.name)")
        }
    }

    /// `--tensor-type` overrides can leave an expert's three matrices in different types, so
    /// grouped and plain rows meet in one expert (grouped gate with a q8_0 up, grouped gate and
    /// up with a q8_0 down, a q8_0 gate with grouped up). Each combination runs, as a prompt and
    /// token by token, and every layer adds what it adds in the same package with plain rows, to
    /// the rounding of reordered sums.
    @Test(arguments: ["up", "down", "gate"], tiers)
    func mixedExpertTypesRunInAnyLayout(overridden: String, tier: DotKernels.InstructionSet) throws {
        let model = "tiny-4b-like"
        let tokens = try Self.tokens(model)
        let scratch = Scratch()
        let float = try PackageReader(path: try Packages.path(model, .f32))
        var paths: [String] = []
        for grouped in [true, false] {
            let policy = QuantizationPolicy(type: .q4_0, overrides: [("*.\(overridden)", .q8_0)], groupedLayouts: grouped)
            let path = scratch.file("\(grouped ? "grouped" : "plain").stpk")
            try Quantizer.write(try Quantizer.plan(source: float, policy: policy), to: path, overwrite: true, threads: 2)
            paths.append(path)
        }
        let grouped = try Model(path: paths[0]), plain = try Model(path: paths[1], copyHotMatrices: false)
        let expert = grouped.layers[1].experts[2]
        let layouts = [expert.gate.layout, expert.up.layout, expert.down.layout]
        let expected: [TensorLayout] = ["gate", "up", "down"].map { $0 == overridden || $0 == "down" ? .rowMajor : .rowMajorX8 }
        #expect(layouts == expected, "\(layouts)")
        for batched in [true, false] {
            Self.expect(
                try TeacherForcing.layerByLayer(base: plain, other: grouped, tokens: tokens, kernels: tier, batched: batched),
                within: Self.reordered, "\(overridden) overridden, \(batched ? "prompt" : "token by token") on \(tier.name)")
        }
    }

    /// The Q4_0 × Q8_0 integer kernels against the same weights dequantised to float32 and
    /// computed in float: their difference (activation quantisation) must be small next to the
    /// weight quantisation itself. Measured, layer by layer: kernels 0.013 mean relative
    /// difference and a logits' KL of 8e-5–1.8e-4; weights 0.20–0.21 and 0.021–0.048.
    @Test(arguments: Reference.models, tiers)
    func quantisedKernelsTrackTheDequantisedFloatComputation(model: String, tier: DotKernels.InstructionSet) throws {
        let tokens = try Self.tokens(model)
        let scratch = Scratch()
        let quantised = try Model(path: try Packages.path(model, .q4_0))
        let base = try Model(path: try Packages.path(model, .f32))
        let dequantised = try Model(path: try dequantizedCopy(of: try Packages.path(model, .q4_0), in: scratch))
        let kernels = try TeacherForcing.layerByLayer(base: dequantised, other: quantised, tokens: tokens, kernels: tier, batched: true)
        let weights = try TeacherForcing.layerByLayer(base: base, other: dequantised, tokens: tokens, kernels: tier, batched: true)
        #expect(kernels.layers.mean < weights.layers.mean / 8, "kernels \(kernels.layers) vs weight quantisation \(weights.layers)")
        #expect(
            kernels.logits.meanKL < weights.logits.meanKL / 20,
            "kernel KL \(kernels.logits.meanKL) vs weight-quantisation KL \(weights.logits.meanKL)")
        #expect(
            kernels.layers.mean < 0.02 && kernels.layers.worst < 0.066 && kernels.logits.meanKL < 2.7e-4,
            "\(kernels.layers), KL \(kernels.logits.meanKL)")
    }

    /// Decoding one token at a time (the C expert path, experts split across workers) and a
    /// batched prompt (gates shared across the tokens of each expert) compute the same quantised
    /// model: every layer, given the prompt's inputs, adds the same to rounding (measured: at
    /// most 1.4e-7 relative). A wrong cache or expert path differs by whole values.
    @Test(arguments: [TensorDType.q4_0, .q8_0], tiers)
    func quantisedDecodingMatchesTheBatchedPrompt(type: TensorDType, tier: DotKernels.InstructionSet) throws {
        let tokens = try Self.tokens("tiny-4b-like")
        let model = try Model(path: try Packages.path("tiny-4b-like", type))
        Self.expect(
            try TeacherForcing.layerByLayer(base: model, other: model, tokens: tokens, kernels: tier, batched: false, baseBatched: true),
            within: Self.reordered, "\(type.rawValue) on \(tier.name)")
    }
}
