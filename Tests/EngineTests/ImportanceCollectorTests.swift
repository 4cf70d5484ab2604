import Foundation
import Format
import Testing
@testable import Engine

/// `ImportanceCollector` (what `strun imatrix` writes) against the definition: the same sums of
/// squared matrix inputs accumulated from ScalarForward's own inputs to every matrix, chunk by
/// chunk, on the trained fixture.
@Suite struct ImportanceCollectorTests {
    static let model = Reference.trained

    /// 80 held-out tokens in chunks of 40 (past the window of 32), on every tier, with float32
    /// weights: token counts equal and each column's sum within 1e-4 of the definition's,
    /// relative to the matrix's largest column. Free-running, so the text is one whose router
    /// margins are all at least 2e-3 in the definition (held-out tokens 280-359; the first 80 have
    /// a margin of 5e-4, which float32 rounding flips on the AVX2 tier). (With Q4_0 weights the runtime multiplies Q8_0 activations
    /// and a few close routings of this text go the other way, so the sums are not comparable
    /// free-running: `activationsAreTheDefinitionsGivenTheSameInput` checks those paths.)
    @Test(arguments: DotKernels.InstructionSet.supported)
    func sumsAreTheDefinitionsSums(tier: DotKernels.InstructionSet) throws {
        do {
            let path = try Packages.path(Self.model, .f32)
            let model = try Model(path: path)
            let c = model.config
            let ids = Array(try KVCacheTests.heldOut(model, count: 360).suffix(80)), chunk = 40
            let session = try Session(model: model, contextLength: chunk, threads: 2, kernels: tier, kvType: .f32)
            let collector = ImportanceCollector(session: session)
            var progress: [Int] = []
            try collector.feed(ids, chunk: chunk) { done, count in progress.append(done * 10 + count) }
            #expect(progress == [12, 22] && collector.tokens == ids.count && collector.chunksCollected == 2)
            let matrix = collector.matrix(datasets: ["held-out"])

            // The definition's sums, named as the collector names them.
            var expected: [String: (sums: [Double], counts: [Int])] = [:]
            func add(_ tensor: String, matrix m: Int, matrices: Int, _ values: [Double]) {
                let name = ImportanceMatrix.source(of: tensor)!.name, n = values.count
                var entry = expected[name] ?? ([Double](repeating: 0, count: n * matrices), [Int](repeating: 0, count: matrices))
                for i in 0..<n { entry.sums[m * n + i] += values[i] * values[i] }
                entry.counts[m] += 1
                expected[name] = entry
            }
            let scalar = ScalarForward(package: try PackageReader(path: path))
            var margin = Float.infinity
            for start in stride(from: 0, to: ids.count, by: chunk) {
                let trace = scalar.run(Array(ids[start..<min(ids.count, start + chunk)])) { l, input, values in
                    switch input {
                    case .attention:
                        for t in [TensorNames.query(l), TensorNames.key(l), TensorNames.value(l)] { add(t, matrix: 0, matrices: 1, values) }
                    case .attentionOutput: add(TensorNames.attentionOutput(l), matrix: 0, matrices: 1, values)
                    case .expert(let e):
                        for t in [TensorNames.expertGate(l, 0), TensorNames.expertUp(l, 0)] {
                            add(t, matrix: e, matrices: c.expertCount, values)
                        }
                    case .activations(let e): add(TensorNames.expertDown(l, 0), matrix: e, matrices: c.expertCount, values)
                    case .final: add(c.tieWordEmbeddings ? TensorNames.embedding : TensorNames.output, matrix: 0, matrices: 1, values)
                    }
                }
                margin = min(margin, trace.margins.flatMap { $0 }.min()!)
            }
            try #require(margin >= 2e-3, "the text's closest routing has a margin of \(margin)")
            let label = "float32 on \(tier.name)"
            #expect(Set(matrix.entries.keys) == Set(expected.keys), "\(label)")
            #expect(matrix.entries.count == 7 * c.layerCount + 1)
            let bound = 1e-4
            for (name, want) in expected {
                let got = try #require(matrix.entries[name])
                #expect(got.counts == want.counts.map(Float.init), "\(label): \(name) counts \(got.counts) against \(want.counts)")
                let scale = want.sums.max()!
                let worst = zip(got.sums, want.sums).map { abs(Double($0) - $1) / scale }.max()!
                #expect(worst < bound, "\(label): \(name) differs by \(worst) of its largest column")
            }
            #expect(matrix.chunkCount == 2 && matrix.chunkSize == chunk && matrix.datasets == ["held-out"])
        }
    }

    /// The activations the experts record (what `strun imatrix` squares for the down matrices),
    /// on the paths each package takes (float rows; Q4_0 grouped; Q4_0 plain rows; batches of
    /// 40, 3 and 1 tokens, so experts with many tokens, one token, and a one-token step), against
    /// relu(W_gate h) ⊙ (W_up h) computed in double from the same h and the decoded weights:
    /// within 1e-5 of the layer's largest activation for float32 weights, 1e-2 for Q4_0 (whose
    /// runtime multiplies h rounded to Q8_0: an error absolute, not relative to each value). Every
    /// (token, expert) the router chose is recorded once.
    @Test(arguments: DotKernels.InstructionSet.supported)
    func activationsAreTheDefinitionsGivenTheSameInput(tier: DotKernels.InstructionSet) throws {
        for (dtype, plainRows) in [(TensorDType.f32, false), (.q4_0, false), (.q4_0, true)] {
            let path = try Packages.path(Self.model, dtype, plainRows: plainRows)
            let model = try Model(path: path, arrangeExperts: !plainRows)
            let c = model.config, hidden = c.hiddenSize, ffn = c.expertFFNSize
            let scalar = ScalarForward(package: try PackageReader(path: path))
            let session = try Session(model: model, contextLength: 64, threads: 2, kernels: tier)
            let label = "\(dtype)\(plainRows ? " plain rows" : "") on \(tier.name)"
            // (layer, position, expert) as routed and as recorded.
            var input: [Float] = [], routed: [[Int]] = [], recorded: [[Int]] = [], stepStart = 0
            var error = [Double](repeating: 0, count: c.layerCount), largest = error
            session.routingObserver = { d in for e in d.experts { routed.append([d.layer, d.position, e]) } }
            session.expertInputHook = { _, _, values in input = Array(values) }
            session.expertActivationHook = { layer, expert, tokenRows, activations in
                for (i, t) in tokenRows.enumerated() {
                    let h = (0..<hidden).map { Double(input[t * hidden + $0]) }
                    let gate = scalar.matmul(scalar.layers[layer].gate[expert], h, rows: ffn)
                    let up = scalar.matmul(scalar.layers[layer].up[expert], h, rows: ffn)
                    let want = (0..<ffn).map { gate[$0] > 0 ? gate[$0] * up[$0] : 0 }
                    largest[layer] = max(largest[layer], want.map(abs).max()!)
                    error[layer] = max(error[layer], (0..<ffn).map { abs(Double(activations[i * ffn + $0]) - want[$0]) }.max()!)
                    recorded.append([layer, stepStart + t, expert])
                }
            }
            let ids = try KVCacheTests.heldOut(model, count: 44)
            for batch in [Array(ids[0..<40]), Array(ids[40..<43]), [ids[43]]] {
                stepStart = session.position
                _ = try session.evaluate(batch)
            }
            #expect(routed.count == 44 * c.layerCount * c.activeExperts)
            #expect(
                Set(routed.map { $0.description }) == Set(recorded.map { $0.description }) && recorded.count == routed.count, "\(label)")
            let worst = zip(error, largest).map { $0 / $1 }.max()!
            #expect(worst < (dtype == .f32 ? 1e-5 : 1e-2), "\(label): activations differ by \(worst) of a layer's largest")
        }
    }
}
