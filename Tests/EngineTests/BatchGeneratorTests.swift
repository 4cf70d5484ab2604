import Foundation
import Format
import Testing
@testable import Engine

/// The scheduler that runs many generations at once, through its public API as an application
/// uses it: streams, sampling parameters, stop strings and limits, cancellation, a bounded queue.
@Suite(.timeLimit(.minutes(3))) struct BatchGeneratorTests {
    static func model(budget: Bool = false) throws -> Model {
        try Model(path: try Packages.path(Reference.trained, .q4_0), arrangeExperts: !budget)
    }

    /// Everything a stream gave: the text, the tokens, the summary.
    struct Outcome {
        var text = ""
        var tokens: [Int] = []
        var summary: GenerationSummary?
    }

    static func collect(_ stream: AsyncThrowingStream<GenerationPiece, any Error>) async throws -> Outcome {
        var outcome = Outcome()
        for try await piece in stream {
            outcome.text += piece.text
            if let token = piece.token { outcome.tokens.append(token) }
            if let finish = piece.finish { outcome.summary = finish }
        }
        return outcome
    }

    static func sampling(seed: UInt64, temperature: Float) -> SamplingParameters {
        var p = SamplingParameters()
        p.seed = seed
        p.temperature = temperature
        return p
    }

    /// A generation that runs alone takes the same steps as `TextGenerator` on a one-sequence
    /// session, so its text and tokens are the same, bit for bit, whatever the number of
    /// sequences the generator holds, with and without a memory budget.
    @Test(arguments: [1, 3], [false, true])
    func aLoneGenerationIsWhatTextGeneratorGives(parallel: Int, budget: Bool) async throws {
        let model = try Self.model(budget: budget)
        let tokenizer = try Tokenizer(package: model.package)
        let messages = [ChatMessage(role: "user", content: "And it came to pass")]
        var stopFromText: [String] = []
        let runs: [(UInt64, Float, [String]?)] = [(1, 0, []), (7, 0.9, []), (7, 0.9, nil)]
        for (seed, temperature, stops) in runs {
            // The last run stops at a piece from the middle of the one before it.
            let stops = stops ?? stopFromText
            let session = try Session(model: model, contextLength: 256, threads: 2)
            var generator = TextGenerator(
                session: session, tokenizer: tokenizer, sampling: Self.sampling(seed: seed, temperature: temperature), stopStrings: stops)
            var expected = ""
            let prompt = tokenizer.encode(ChatTemplate.render(messages))
            let (ids, reason) = try generator.run(prompt: prompt, maximumTokens: 40) { expected += $0 }
            let scalars = Array(expected.unicodeScalars)
            stopFromText = [String(String.UnicodeScalarView(scalars[scalars.count / 2..<scalars.count / 2 + 3]))]

            let memoryBudget = budget ? ExpertStreamingTests.budget(model, slots: 12, context: 256, sequences: parallel) : nil
            let batch = try BatchGenerator(
                model: model, tokenizer: tokenizer, parallel: parallel, contextLength: 256, threads: 2, memoryBudget: memoryBudget)
            let outcome = try await Self.collect(
                batch.generate(
                    GenerationRequest(
                        prompt: .chat(messages), sampling: Self.sampling(seed: seed, temperature: temperature), maximumTokens: 40,
                        stopStrings: stops)))
            let label = "seed \(seed), temperature \(temperature), stops \(stops), \(parallel) sequences, budget \(budget)"
            #expect(outcome.text == expected, "\(label)")
            #expect(outcome.tokens == ids, "\(label)")
            #expect(outcome.summary?.reason == reason && outcome.summary?.generatedTokens == ids.count, "\(label)")
            #expect(outcome.summary?.promptTokens == prompt.count)
            if !stops.isEmpty { #expect(reason == .stopString, "the stop string is met: \(expected)") }
            batch.shutdown()
        }
    }

    /// Generations started together share steps: with four at once the steps are far fewer than
    /// the tokens, and each ends by its own limit, stop string or sampling parameters.
    @Test func concurrentGenerationsShareStepsAndEndByTheirOwnRules() async throws {
        let model = try Self.model()
        let tokenizer = try Tokenizer(package: model.package)
        let batch = try BatchGenerator(model: model, tokenizer: tokenizer, parallel: 4, contextLength: 256, threads: 2)
        let requests = [
            GenerationRequest(prompt: .text("In the beginning"), sampling: Self.sampling(seed: 1, temperature: 0), maximumTokens: 30),
            GenerationRequest(prompt: .text("And the LORD said"), sampling: Self.sampling(seed: 2, temperature: 1.0), maximumTokens: 25),
            GenerationRequest(
                prompt: .chat([ChatMessage(role: "user", content: "Blessed are")]), sampling: Self.sampling(seed: 3, temperature: 0.7),
                maximumTokens: 60, stopStrings: [" the"]),
            GenerationRequest(
                prompt: .tokens(tokenizer.encode("Thou shalt")), sampling: Self.sampling(seed: 4, temperature: 0), maximumTokens: 1)
        ]
        let outcomes = try await withThrowingTaskGroup(of: (Int, Outcome).self) { group in
            for (i, request) in requests.enumerated() { group.addTask { (i, try await Self.collect(batch.generate(request))) } }
            var all = [Outcome](repeating: Outcome(), count: requests.count)
            for try await (i, outcome) in group { all[i] = outcome }
            return all
        }
        for (request, outcome) in zip(requests, outcomes) {
            let summary = try #require(outcome.summary)
            #expect(summary.generatedTokens == outcome.tokens.count && summary.generatedTokens <= request.maximumTokens)
            #expect(summary.promptTokens == batch.promptTokens(request.prompt).count)
            switch summary.reason {
            case .maximumTokens: #expect(outcome.tokens.count == request.maximumTokens)
            case .stopString: #expect(!request.stopStrings.isEmpty && !outcome.text.contains(" the"))
            case .endOfSequence:
                #expect(tokenizer.specialIDs.contains(outcome.tokens.last!) || model.config.eosTokenIDs.contains(outcome.tokens.last!))
            case .contextFull: Issue.record("the context of 256 is not reached")
            }
        }
        #expect(outcomes[3].tokens.count == 1)
        let stats = batch.statistics
        let generated = outcomes.reduce(0) { $0 + $1.tokens.count }
        #expect(stats.generatedTokens == generated && stats.finished == 4 && stats.running == 0 && stats.waiting == 0)
        #expect(stats.steps < generated, "steps are shared: \(stats.steps) steps for \(generated) tokens")
        batch.shutdown()
    }

    /// Cancelling the task that consumes a stream ends the generation at the next step and frees
    /// its sequence: with one sequence, a generation waiting behind it then runs. (The cancelled
    /// one asks for the whole context, thousands of steps, so that it cannot finish on its own
    /// while the test waits to be scheduled on a loaded machine.)
    @Test func cancellingTheConsumerFreesTheSequence() async throws {
        let model = try Self.model()
        let context = model.config.maxPositionEmbeddings
        let batch = try BatchGenerator(
            model: model, tokenizer: try Tokenizer(package: model.package), parallel: 1, contextLength: context, threads: 2)
        let limit = context - 8
        let long = GenerationRequest(
            prompt: .text("And"), sampling: Self.sampling(seed: 1, temperature: 1), maximumTokens: limit, ignoreEndOfSequence: true)
        let started = AsyncStream<Void>.makeStream()
        let consumer = Task {
            var count = 0
            for try await _ in batch.generate(long) {
                count += 1
                if count == 3 { started.continuation.yield() }
            }
            return count
        }
        for await _ in started.stream { break }
        // A second generation waits for the only sequence.
        let waiting = Task { try await Self.collect(batch.generate(GenerationRequest(prompt: .text("Amen"), maximumTokens: 5))) }
        consumer.cancel()
        let count = try await consumer.value
        #expect(count < limit, "the cancelled generation stopped early (\(count) pieces)")
        let second = try await waiting.value
        #expect(second.summary?.generatedTokens ?? 0 >= 1, "the waiting generation ran on the freed sequence")
        var stats = batch.statistics
        for _ in 0..<100 where stats.running > 0 {
            try await Task.sleep(for: .milliseconds(10))
            stats = batch.statistics
        }
        #expect(stats.running == 0 && stats.waiting == 0 && stats.finished == 2)
        #expect(stats.generatedTokens < limit)
        batch.shutdown()
    }

    /// Past the running sequences and `maximumWaiting` waiting ones, a generation fails at once;
    /// a prompt that does not fit the context, an empty one, a limit of 0 tokens and a shut-down
    /// generator are errors too, and none of them stops the generator.
    @Test func refusalsAreErrorsAndTheGeneratorGoesOn() async throws {
        let model = try Self.model()
        let tokenizer = try Tokenizer(package: model.package)
        let batch = try BatchGenerator(model: model, tokenizer: tokenizer, parallel: 1, contextLength: 64, threads: 2, maximumWaiting: 1)
        func failure(_ request: GenerationRequest) async -> EngineError? {
            do {
                _ = try await Self.collect(batch.generate(request))
                return nil
            } catch {
                return error as? EngineError
            }
        }
        #expect(await failure(GenerationRequest(prompt: .tokens(Array(repeating: 5, count: 64)))) == .inputTooLong(tokens: 64, context: 64))
        #expect(await failure(GenerationRequest(prompt: .text(""))) == .emptyInput)
        #expect(await failure(GenerationRequest(prompt: .tokens([1]), maximumTokens: 0)) == .emptyInput)
        #expect(
            await failure(GenerationRequest(prompt: .tokens([model.config.vocabSize])))
                == .invalidToken(id: model.config.vocabSize, vocabularySize: model.config.vocabSize))
        // One running, one waiting, the third refused.
        let slow = GenerationRequest(prompt: .text("And"), sampling: Self.sampling(seed: 1, temperature: 1), maximumTokens: 60)
        let first = batch.generate(slow), second = batch.generate(slow)
        #expect(await failure(slow) == .queueFull(waiting: 1))
        let a = try await Self.collect(first), b = try await Self.collect(second)
        #expect(a.summary != nil && b.summary != nil)
        // Still serving.
        let after = try await Self.collect(batch.generate(GenerationRequest(prompt: .text("And"), maximumTokens: 3)))
        #expect(after.summary?.generatedTokens ?? 0 >= 1)
        batch.shutdown()
        #expect(await failure(slow) == .shutDown)
    }

    /// Shutting down ends running generations with an error at the next step (or lets them
    /// finish when asked), fails waiting ones, and returns once the thread has stopped.
    @Test func shutdownEndsRunningGenerations() async throws {
        let model = try Self.model()
        // The whole context, thousands of steps: it cannot end on its own before the shutdown.
        let context = model.config.maxPositionEmbeddings
        let batch = try BatchGenerator(
            model: model, tokenizer: try Tokenizer(package: model.package), parallel: 1, contextLength: context, threads: 2)
        let request = GenerationRequest(
            prompt: .text("And"), sampling: Self.sampling(seed: 1, temperature: 1), maximumTokens: context - 8,
            ignoreEndOfSequence: true)
        let running = batch.generate(request), waiting = batch.generate(request)
        // Waits for the first step without suspending: a suspended test can wait seconds for a
        // thread while the suite's other tests hold them all, and meanwhile the generation, run
        // by the generator's own thread, could end on its own.
        let deadline = Date().addingTimeInterval(60)
        while batch.statistics.generatedTokens == 0 && Date() < deadline { usleep(1000) }
        #expect(batch.statistics.running == 1 && batch.statistics.generatedTokens > 0)
        batch.shutdown()
        var iterator = running.makeAsyncIterator()
        var ended: EngineError? = nil
        do { while try await iterator.next() != nil {} } catch { ended = error as? EngineError }
        #expect(ended == .shutDown)
        await #expect(throws: EngineError.shutDown) { _ = try await Self.collect(waiting) }

        let finishing = try BatchGenerator(
            model: model, tokenizer: try Tokenizer(package: model.package), parallel: 1, contextLength: 512, threads: 2)
        let stream = finishing.generate(GenerationRequest(prompt: .text("And"), maximumTokens: 12))
        var first = stream.makeAsyncIterator()
        _ = try await first.next()
        finishing.shutdown(finishRunning: true)
        var pieces = 1, summary: GenerationSummary? = nil
        while let piece = try await first.next() {
            pieces += 1
            summary = piece.finish ?? summary
        }
        #expect(summary != nil, "a running generation finishes when asked (\(pieces) pieces)")
    }
}
