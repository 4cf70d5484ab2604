import Foundation
import Testing
@testable import Engine

/// Each sampler stage against its definition, and the chat template.
@Suite struct SamplerTests {
    func parameters(
        temperature: Float, topK: Int = 0, topP: Float = 1, minP: Float = 0, penalty: Float = 1, seed: UInt64 = 1
    ) -> SamplingParameters {
        var p = SamplingParameters()
        p.temperature = temperature
        p.topK = topK
        p.topP = topP
        p.minP = minP
        p.repetitionPenalty = penalty
        p.seed = seed
        return p
    }

    func histogram(_ p: SamplingParameters, _ logits: [Float], draws: Int = 20_000, history: [Int] = []) -> [Double] {
        var sampler = Sampler(p)
        var counts = [Double](repeating: 0, count: logits.count)
        for _ in 0..<draws { counts[sampler.sample(logits[...], history: history)] += 1 }
        return counts.map { $0 / Double(draws) }
    }

    static let logits: [Float] = [2.0, 1.0, 0.5, -1.0, 3.0, 0.0]

    func softmax(_ x: [Float], temperature: Float) -> [Double] {
        let m = Double(x.max()!)
        let e = x.map { exp((Double($0) - m) / Double(temperature)) }
        let s = e.reduce(0, +)
        return e.map { $0 / s }
    }

    @Test func temperatureZeroIsArgmax() {
        var s = Sampler(parameters(temperature: 0))
        #expect(s.sample(Self.logits[...]) == 4)
        #expect(s.sample([1, 5, 5, 2][...]) == 1, "ties go to the lower id")
    }

    @Test(arguments: [Float(0.5), 1.0, 2.0])
    func temperatureDrawsFollowTheTemperedSoftmax(temperature: Float) {
        let observed = histogram(parameters(temperature: temperature), Self.logits)
        let expected = softmax(Self.logits, temperature: temperature)
        for (o, e) in zip(observed, expected) { #expect(abs(o - e) < 0.015, "observed \(o), expected \(e)") }
    }

    @Test func topKKeepsOnlyTheKMostLikely() {
        let observed = histogram(parameters(temperature: 1, topK: 2), Self.logits)
        let expected = softmax([3.0, 2.0], temperature: 1)
        #expect(abs(observed[4] - expected[0]) < 0.015 && abs(observed[0] - expected[1]) < 0.015)
        #expect(observed[1] + observed[2] + observed[3] + observed[5] == 0)
    }

    @Test func topPKeepsTheSmallestSetReachingP() {
        // Sorted probabilities at T = 1: 0.594, 0.219, 0.080, 0.049, 0.029, 0.011.
        let p = softmax(Self.logits, temperature: 1)
        #expect(p[4] < 0.8 && p[4] + p[0] >= 0.8)
        let observed = histogram(parameters(temperature: 1, topP: 0.8), Self.logits)
        #expect(observed[1] + observed[2] + observed[3] + observed[5] == 0, "only tokens 4 and 0 reach 0.8")
        #expect(abs(observed[4] - p[4] / (p[4] + p[0])) < 0.015)
    }

    @Test func minPDropsTokensBelowTheFraction() {
        let p = softmax(Self.logits, temperature: 1)
        let observed = histogram(parameters(temperature: 1, minP: 0.1), Self.logits)
        for i in p.indices {
            if p[i] < 0.1 * p[4] { #expect(observed[i] == 0, "token \(i) has p \(p[i])") } else { #expect(observed[i] > 0) }
        }
    }

    @Test func repetitionPenaltyDividesPositiveAndMultipliesNegativeLogits() {
        // Token 4 (logit 3) seen with penalty 2 becomes 1.5 < token 0's 2: greedy picks 0.
        var s = Sampler(parameters(temperature: 0, penalty: 2))
        #expect(s.sample(Self.logits[...], history: [4, 4]) == 0)
        // A negative logit gets more negative: token 0 (-1, seen) against token 5 (0), the others
        // negligible; token 0 becomes -2, so its share shrinks to softmax([-2, 0]).
        let observed = histogram(parameters(temperature: 1, penalty: 2), [-1, -50, -50, -50, -50, 0].map { Float($0) }, history: [0])
        let expected = softmax([-2, 0], temperature: 1)
        #expect(abs(observed[0] - expected[0]) < 0.015)
    }

    @Test func sameSeedSameDrawsOtherSeedOtherDraws() {
        let a = histogramSequence(seed: 9), b = histogramSequence(seed: 9), c = histogramSequence(seed: 10)
        #expect(a == b)
        #expect(a != c)
    }

    func histogramSequence(seed: UInt64) -> [Int] {
        var s = Sampler(parameters(temperature: 1, seed: seed))
        return (0..<50).map { _ in s.sample(Self.logits[...]) }
    }

    @Test func defaultsComeFromTheGenerationConfig() {
        let config = Array(#"{"temperature": 0.7, "top_k": 40, "top_p": 0.8, "repetition_penalty": 1.1, "do_sample": true}"#.utf8)
        let p = SamplingParameters.defaults(generationConfig: config)
        #expect(p.temperature == 0.7 && p.topK == 40 && p.topP == 0.8 && p.repetitionPenalty == Float(1.1))
        let none = SamplingParameters.defaults(generationConfig: nil)
        #expect(none.temperature == 0.6 && none.topK == 20 && none.topP == 0.95)
        let greedy = SamplingParameters.defaults(generationConfig: Array(#"{"do_sample": false, "temperature": 0.9}"#.utf8))
        #expect(greedy.temperature == 0)
    }
}

@Suite struct ChatTests {
    @Test func chatMLPromptText() {
        #expect(
            ChatTemplate.prompt(user: "Hi")
                == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        #expect(ChatTemplate.prompt(user: "Hi", system: nil) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
        #expect(ChatTemplate.prompt(user: "x", system: "Be brief.").hasPrefix("<|im_start|>system\nBe brief.<|im_end|>\n"))
        let history = ChatTemplate.render(
            [.init(role: "user", content: "a"), .init(role: "assistant", content: "b")], addGenerationPrompt: false)
        #expect(history == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n")
    }

    /// The tiny model with the tiny tokenizer (same pipeline as Qwen's, 458 ids).
    static func generator(seed: UInt64 = 0, temperature: Float = 0) throws -> TextGenerator {
        let scratch = Scratch()
        let path = scratch.file("t.stpk")
        let checkpoint = try Checkpoint(
            directory: Reference.root + "/tiny-4b-like", tokenizerDirectory: TokenizerFixture.root + "/tiny-tokenizer")
        try Converter.write(try Converter.plan(checkpoint: checkpoint, dtype: nil), to: path, overwrite: false)
        let model = try Model(path: path)
        let tokenizer = try Tokenizer(json: model.package.fileContents("tokenizer.json")!, path: "tokenizer.json")
        var p = SamplingParameters()
        p.temperature = temperature
        p.seed = seed
        return TextGenerator(session: try Session(model: model, threads: 1), tokenizer: tokenizer, sampling: p)
    }

    @Test func stopStringsEndTheTextBeforeThem() throws {
        var free = try Self.generator()
        free.stopTokens = []
        let prompt = free.tokenizer.encode("Hello, how are")
        var full = ""
        let (ids, reason) = try free.run(prompt: prompt, maximumTokens: 24) { full += $0 }
        #expect(reason == .maximumTokens && ids.count == 24)
        #expect(full == (try free.tokenizer.decode(ids)))
        // Stop at a piece from the middle of that text.
        let scalars = Array(full.unicodeScalars)
        let stop = String(String.UnicodeScalarView(scalars[scalars.count / 2..<scalars.count / 2 + 3]))
        let expected = String(full[..<full.firstRange(of: stop)!.lowerBound])
        var stopped = try Self.generator()
        stopped.stopTokens = []
        stopped.stopStrings = [stop]
        var text = ""
        let result = try stopped.run(prompt: prompt, maximumTokens: 24) { text += $0 }
        #expect(result.reason == .stopString)
        #expect(text == expected)
    }

    @Test func stopTokensEndGeneration() throws {
        var free = try Self.generator()
        free.stopTokens = []
        let prompt = free.tokenizer.encode("The quick")
        let (ids, _) = try free.run(prompt: prompt, maximumTokens: 10) { _ in }
        var stopping = try Self.generator()
        stopping.stopTokens = [ids[4]]
        let (stoppedIDs, reason) = try stopping.run(prompt: prompt, maximumTokens: 10) { _ in }
        #expect(reason == .endOfSequence)
        #expect(stoppedIDs == Array(ids[0...ids.firstIndex(of: ids[4])!]))
        // <|im_end|> and <|endoftext|> are stop tokens by default, with the model's EOS ids.
        #expect(stopping.tokenizer.id(of: "<|im_end|>").map { try! Self.generator().stopTokens.contains($0) } == true)
        #expect(try Self.generator().stopTokens.isSuperset(of: [0, 2, 3]))
    }

    @Test func generatedTokensStayInsideTheTokenizer() throws {
        var g = try Self.generator(seed: 5, temperature: 1.5)
        g.stopTokens = []
        let (ids, _) = try g.run(prompt: g.tokenizer.encode("Hi"), maximumTokens: 40) { _ in }
        #expect(ids.allSatisfy { $0 < g.tokenizer.vocabularySize }, "the model's rows past the tokenizer are padding")
    }

    @Test func conversationCarriesTheCacheAcrossTurns() throws {
        let conversation = Conversation(generator: try Self.generator(), system: ChatTemplate.defaultSystemPrompt)
        try conversation.reply(to: "Hello", maximumTokens: 5) { _ in }
        let afterFirst = conversation.session.position
        try conversation.reply(to: "Again", maximumTokens: 5) { _ in }
        #expect(conversation.session.position > afterFirst, "the second turn continues the first")
        #expect(conversation.messages.map(\.role) == ["user", "assistant", "user", "assistant"])
        conversation.reset()
        #expect(conversation.session.position == 0 && conversation.messages.isEmpty)
    }
}
