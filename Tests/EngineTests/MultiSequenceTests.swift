import Foundation
import Format
import Testing
@testable import Engine

/// Several sequences in one forward step: each must get what it gets alone. One sequence in a
/// session of several is today's `Session` bit for bit; several at once are compared layer by
/// layer, each row of every layer given its sequence's own input from a run alone
/// (`TeacherForcing`), since a step of many sequences sums in other orders than a run alone.
@Suite struct MultiSequenceTests {
    static let tiers = DotKernels.InstructionSet.supported

    /// Three sequences of different lengths from the fixture's texts.
    static func sequences(_ model: String) throws -> [[Int]] {
        let reference = try Reference.load(model)
        let long = reference.sequences["long"]!.inputIDs, short = reference.sequences["short"]!.inputIDs
        return [long, short + Array(long.prefix(9)), Array(long.reversed().prefix(29))]
    }

    /// What a scheduler does: each sequence joins at its own step with a prompt taken in chunks
    /// of what the step has room for (`room` tokens in all), then decodes a token per step
    /// beside the others. Steps mix decode tokens with a chunk of another's prompt.
    static func schedule(lengths: [Int], prompts: [Int], joins: [Int], room: Int) -> [[(sequence: Int, count: Int)]] {
        var steps: [[(sequence: Int, count: Int)]] = []
        var fed = [Int](repeating: 0, count: lengths.count)
        var step = 0
        while zip(fed, lengths).contains(where: { $0 < $1 }) {
            var chunks: [(sequence: Int, count: Int)] = [], left = room
            for s in lengths.indices where joins[s] <= step && fed[s] >= prompts[s] && fed[s] < lengths[s] {
                chunks.append((s, 1))
                left -= 1
            }
            for s in lengths.indices where joins[s] <= step && fed[s] < prompts[s] && left > 0 {
                let take = min(left, prompts[s] - fed[s])
                chunks.append((s, take))
                left -= take
            }
            for (s, count) in chunks { fed[s] += count }
            if !chunks.isEmpty { steps.append(chunks) }
            step += 1
        }
        return steps
    }

    /// One sequence of a many-sequence session, fed as a session is (a prompt, then a token at a
    /// time) through either API, gives today's logits bit for bit, with the others idle or not.
    @Test(arguments: [Reference.trained, "tiny-21b-like"], tiers)
    func aSequenceAloneIsBitForBitASession(model name: String, tier: DotKernels.InstructionSet) throws {
        let tokens = try Self.sequences(name)[0]
        for budgeted in [false, true] {
            let model = try Model(path: try Packages.path(name, .q4_0), arrangeExperts: !budgeted)
            let context = max(64, tokens.count)
            let budget =
                budgeted ? ExpertStreamingTests.budget(model, slots: model.config.activeExperts + 3, context: context, sequences: 3) : nil
            // Logits are the same bit for bit with and without a budget (ExpertStreamingTests).
            let single = try Session(model: model, contextLength: context, threads: 2, kernels: tier)
            var expected = try single.evaluate(Array(tokens[..<20]))
            for t in tokens[20...] { expected += try single.evaluate([t]) }
            let many = try Session(model: model, contextLength: context, threads: 2, memoryBudget: budget, kernels: tier, sequences: 3)
            // Sequence 2, after sequence 0 has run and been reset: its cache is reused.
            _ = try many.evaluate([SequenceChunk(sequence: 0, tokens: Array(tokens[..<5]))])
            many.reset(sequence: 0)
            var logits = try many.evaluate([SequenceChunk(sequence: 2, tokens: Array(tokens[..<20]))])
            for t in tokens[20...] { logits += try many.evaluate([SequenceChunk(sequence: 2, tokens: [t])]) }
            #expect(logits == expected, "\(name) on \(tier.name), budget \(budgeted): the step API differs from Session")
            #expect(many.position(of: 2) == tokens.count && many.position(of: 0) == 0 && many.position(of: 1) == 0)
            single.expertCache?.shutdown()
            many.expertCache?.shutdown()
        }
    }

    /// Three sequences sharing steps (chunked prompts beside other sequences' decoding, joining
    /// at different steps), every row of every layer given its sequence's input from a run
    /// alone: what each layer adds, and the logits, are the run alone's to float reordering (the
    /// suite's bound for two computations that differ only in the order of additions), on every
    /// tier, for float and Q4_0 weights, with and without a memory budget.
    @Test(arguments: Reference.models, tiers)
    func everySequenceGetsWhatItGetsAloneLayerByLayer(model name: String, tier: DotKernels.InstructionSet) throws {
        let tokens = try Self.sequences(name)
        let lengths = tokens.map(\.count)
        let steps = Self.schedule(lengths: lengths, prompts: [12, 17, 5], joins: [0, 2, 3], room: 16)
        #expect(steps.contains { step in step.count >= 2 && step.contains { $0.count > 1 } }, "the schedule mixes prompts and decoding")
        for dtype in [TensorDType.f32, .q4_0] {
            for budgeted in [false, true] {
                let model = try Model(path: try Packages.path(name, dtype), arrangeExperts: !budgeted)
                let alone = try tokens.map { try TeacherForcing.run(model, kernels: tier, tokens: $0, batched: true) }
                let context = max(lengths.max()!, 64)
                let budget =
                    budgeted
                    ? ExpertStreamingTests.budget(
                        model, slots: model.config.activeExperts + 3, context: context, sequences: 3, kvType: .f32) : nil
                let together = try TeacherForcing.runTogether(
                    model, kernels: tier, tokens: tokens, steps: steps, forcing: alone, memoryBudget: budget)
                for s in tokens.indices {
                    let result = (
                        TeacherForcing.compare(alone[s], together[s]),
                        LogitComparison(base: alone[s].logits, other: together[s].logits, vocab: model.config.vocabSize, tokens: tokens[s])
                    )
                    QuantizedModelTests.expect(
                        result, within: QuantizedModelTests.reordered,
                        "\(name) \(dtype.rawValue) sequence \(s) on \(tier.name)\(budgeted ? " under a budget" : "")")
                }
            }
        }
    }

    /// Without forcing, the same schedule gives each sequence's layer inputs at every position
    /// to float rounding of its run alone where the routers are clear of ties: a sequence's
    /// attention reads only its own cache (a wrong cache or position shows as an error of order 1).
    @Test(arguments: tiers)
    func sequencesDoNotSeeEachOthersCaches(tier: DotKernels.InstructionSet) throws {
        let name = "tiny-4b-like"
        let tokens = try Self.sequences(name)
        let model = try Model(path: try Packages.path(name, .f32))
        let steps = Self.schedule(lengths: tokens.map(\.count), prompts: [12, 17, 5], joins: [0, 2, 3], room: 16)
        let alone = try tokens.map { try TeacherForcing.run(model, kernels: tier, tokens: $0, batched: true) }
        let together = try TeacherForcing.runTogether(model, kernels: tier, tokens: tokens, steps: steps)
        for s in tokens.indices {
            let free = TeacherForcing.freeRunning(alone[s], together[s], vocab: model.config.vocabSize, tie: 0.02)
            #expect(free.clearMismatches.isEmpty && free.skipped.count <= tokens[s].count / 10, "sequence \(s): \(free.skipped)")
            #expect(free.logits.maxAbsoluteDifference < 1e-3, "sequence \(s): logits differ by \(free.logits.maxAbsoluteDifference)")
        }
    }

    @Test func stepsAreChecked() throws {
        let model = try Model(path: try Packages.path("tiny-4b-like", .f32))
        let session = try Session(model: model, contextLength: 16, threads: 1, sequences: 2)
        func error(_ chunks: [SequenceChunk]) -> EngineError? {
            do { _ = try session.evaluate(chunks); return nil } catch { return error }
        }
        #expect(error([]) == .emptyInput)
        #expect(error([SequenceChunk(sequence: 2, tokens: [1])]) == .invalidSequence(2, count: 2))
        #expect(error([SequenceChunk(sequence: 0, tokens: [1]), SequenceChunk(sequence: 0, tokens: [2])]) == .duplicateSequence(0))
        #expect(error([SequenceChunk(sequence: 1, tokens: [])]) == .emptyInput)
        #expect(error([SequenceChunk(sequence: 1, tokens: [-1])]) == .invalidToken(id: -1, vocabularySize: model.config.vocabSize))
        #expect(error([SequenceChunk(sequence: 1, tokens: Array(repeating: 1, count: 17))]) == .contextFull(limit: 16))
        let big = try Session(model: model, contextLength: 256, threads: 1, sequences: 2)
        #expect(
            throws: EngineError.batchTooLarge(tokens: 130, maximum: 128),
            performing: {
                _ = try big.evaluate([
                    SequenceChunk(sequence: 0, tokens: Array(repeating: 1, count: 65)),
                    SequenceChunk(sequence: 1, tokens: Array(repeating: 1, count: 65))
                ])
            })
        // Nothing ran: every sequence is still empty.
        #expect(session.position(of: 0) == 0 && session.position(of: 1) == 0)
        #expect(throws: EngineError.sequenceCount(requested: 0, fits: nil, budget: nil)) { try Session(model: model, sequences: 0) }
    }

    /// Under a memory budget every sequence's KV cache counts: asking for more sequences than fit
    /// is refused with the largest count that does, and that count is accepted.
    @Test func aBudgetNamesTheLargestSequenceCountThatFits() throws {
        let model = try Model(path: try Packages.path("tiny-21b-like", .q4_0), arrangeExperts: false)
        let context = 512
        let budget = ExpertStreamingTests.budget(model, slots: model.config.activeExperts, context: context, sequences: 3) + 1000
        #expect(throws: EngineError.sequenceCount(requested: 4, fits: 3, budget: budget)) {
            try Session(model: model, contextLength: context, threads: 2, memoryBudget: budget, sequences: 4)
        }
        do {
            _ = try Session(model: model, contextLength: context, threads: 2, memoryBudget: budget, sequences: 4)
        } catch {
            #expect(error.description.contains("at most 3 do"), "\(error.description)")
            #expect(!error.description.contains("\n"))
        }
        let three = try Session(model: model, contextLength: context, threads: 2, memoryBudget: budget, sequences: 3)
        #expect(three.minimumMemoryBudget <= budget)
        three.expertCache?.shutdown()
    }

    /// Going back in a sequence keeps what it held: the tokens evaluated after a truncation give
    /// the logits of a run that never went further. A sliding window's ring (window + a batch of
    /// positions) can go back only as far as the keys it still holds.
    @Test func truncatingASequenceKeepsItsPrefix() throws {
        let model = try Model(path: try Packages.path("tiny-21b-like", .f32))
        let window = try #require(model.layers.compactMap(\.window).min())
        let ring = KVCache.capacity(context: 1 << 20, window: window)
        var random = SplitMix64(seed: 7)
        let tokens = (0..<ring + 60).map { _ in Int(random.next() % UInt64(model.config.vocabSize)) }
        let vocab = model.config.vocabSize
        let expected = try Session(model: model, contextLength: tokens.count, threads: 2).evaluate(tokens, allLogits: true)
        let session = try Session(model: model, contextLength: tokens.count, threads: 2, sequences: 2)
        // Near the start: back from 23 to 20.
        _ = try session.evaluate([SequenceChunk(sequence: 1, tokens: Array(tokens[..<20]) + [5, 6, 7])])
        #expect(!session.truncate(sequence: 1, to: 24), "past the end")
        #expect(session.truncate(sequence: 1, to: 20))
        let rest = try session.evaluate([SequenceChunk(sequence: 1, tokens: Array(tokens[20..<40]), logits: .all)])
        #expect(rest == Array(expected[20 * vocab..<40 * vocab]))
        // Past the ring: `ring + 30` positions stored, so the ring holds positions from 30 on, and
        // a query at L reads from L - window + 1.
        session.reset(sequence: 1)
        _ = try session.evaluate([SequenceChunk(sequence: 1, tokens: Array(tokens[..<100]))])
        _ = try session.evaluate([SequenceChunk(sequence: 1, tokens: Array(tokens[100..<ring]) + Array(repeating: 9, count: 30))])
        #expect(!session.truncate(sequence: 1, to: window + 28), "keys a query there needs are overwritten")
        #expect(session.truncate(sequence: 1, to: window + 29))
        let after = try session.evaluate([SequenceChunk(sequence: 1, tokens: Array(tokens[(window + 29)..<(window + 49)]), logits: .all)])
        #expect(after == Array(expected[(window + 29) * vocab..<(window + 49) * vocab]))
    }
}
