/// Why generation stopped.
public enum StopReason: String, Sendable {
    case endOfSequence = "end of sequence"
    case stopString = "stop string"
    case maximumTokens = "token limit"
    case contextFull = "context full"
}

/// The token-level generation loop every front end shares (`TextGenerator` for text, `strun
/// generate --ids` without a tokenizer): evaluates the prompt, then samples, stops at a stop
/// token id, at the token limit or when the context is full, and evaluates each new token.
public struct TokenGenerator {
    public let session: Session
    public var sampler: Sampler
    public var stopTokens: Set<Int>
    /// Ids at and past this are never sampled (embedding rows past the tokenizer's vocabulary,
    /// padding in real checkpoints, have no text); nil: every id.
    public var speakable: Int?

    /// Stops at the model's end-of-sequence ids.
    public init(session: Session, sampling: SamplingParameters) {
        self.session = session
        sampler = Sampler(sampling)
        stopTokens = Set(session.model.config.eosTokenIDs)
    }

    /// Feeds `prompt` (ids not yet evaluated; `history` those before it, for the repetition
    /// penalty), then generates up to `maximumTokens`. `next` sees each generated id that is not
    /// a stop token and returns a reason to stop there, or nil to go on. Returns the generated
    /// ids (the stop token included when one ended it) and why it stopped.
    public mutating func run(
        prompt: [Int], history: [Int] = [], maximumTokens: Int,
        next: (Int) throws(EngineError) -> StopReason?
    ) throws(EngineError) -> (ids: [Int], reason: StopReason) {
        guard session.position + prompt.count < session.contextLength else { throw .contextFull(limit: session.contextLength) }
        var logits = try session.evaluate(prompt)
        var generated: [Int] = []
        var seen = history + prompt
        while generated.count < maximumTokens {
            if let speakable { for i in min(speakable, logits.count)..<logits.count { logits[i] = -.infinity } }
            let token = sampler.sample(logits[...], history: seen, generated: generated.count)
            generated.append(token)
            seen.append(token)
            if stopTokens.contains(token) { return (generated, .endOfSequence) }
            if let reason = try next(token) { return (generated, reason) }
            if generated.count == maximumTokens { break }
            if session.position >= session.contextLength { return (generated, .contextFull) }
            logits = try session.evaluate([token])
        }
        return (generated, .maximumTokens)
    }
}

/// Generation as text: the token loop, with the tokens decoded as they come and text streamed
/// once it is final; also stops at `<|im_end|>` / `<|endoftext|>` and at a stop string (which is
/// not printed).
public struct TextGenerator {
    public let tokenizer: Tokenizer
    public var tokens: TokenGenerator
    public var stopStrings: [String]

    public var session: Session { tokens.session }
    public var sampler: Sampler {
        get { tokens.sampler }
        set { tokens.sampler = newValue }
    }
    public var stopTokens: Set<Int> {
        get { tokens.stopTokens }
        set { tokens.stopTokens = newValue }
    }

    public init(session: Session, tokenizer: Tokenizer, sampling: SamplingParameters, stopStrings: [String] = []) {
        self.tokenizer = tokenizer
        tokens = TokenGenerator(session: session, sampling: sampling)
        tokens.stopTokens = TextGenerator.stopTokens(session.model, tokenizer)
        tokens.speakable = tokenizer.vocabularySize
        self.stopStrings = stopStrings.filter { !$0.isEmpty }
    }

    /// The ids text generation stops at: the model's end-of-sequence ids, `<|im_end|>` and
    /// `<|endoftext|>`.
    static func stopTokens(_ model: Model, _ tokenizer: Tokenizer) -> Set<Int> {
        var stops = Set(model.config.eosTokenIDs)
        for name in [ChatTemplate.turnEnd, ChatTemplate.endOfText] {
            if let id = tokenizer.id(of: name) { stops.insert(id) }
        }
        return stops
    }

    /// Feeds `prompt` (ids not yet evaluated), then generates up to `maximumTokens`, calling
    /// `emit` with text as it becomes final. Returns the generated ids and why it stopped.
    public mutating func run(
        prompt: [Int], history: [Int] = [], maximumTokens: Int,
        emit: (String) -> Void
    ) throws(EngineError) -> (ids: [Int], reason: StopReason) {
        var text = TextAssembler(tokenizer: tokenizer, stopStrings: stopStrings)
        let result = try tokens.run(prompt: prompt, history: history, maximumTokens: maximumTokens) {
            (token) throws(EngineError) -> StopReason? in
            let (piece, stopped) = try text.add(token)
            if !piece.isEmpty { emit(piece) }
            return stopped ? .stopString : nil
        }
        if result.reason != .stopString {
            let rest = text.finish()
            if !rest.isEmpty { emit(rest) }
        }
        return result
    }
}

/// Generated ids to text as it becomes final: decodes them with the tokenizer's streaming
/// decoder (special tokens skipped), holds back text that may be the start of a stop string,
/// and ends at the first stop string, which is not part of the text.
public struct TextAssembler: Sendable {
    private var decoder: StreamingDecoder
    private let stopStrings: [String]
    private let holdBack: Int
    private var text = ""  // decoded, not yet released (may be the start of a stop string)

    public init(tokenizer: Tokenizer, stopStrings: [String]) {
        decoder = StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true)
        self.stopStrings = stopStrings.filter { !$0.isEmpty }
        holdBack = (self.stopStrings.map(\.count).max() ?? 1) - 1
    }

    /// Adds a generated id. Returns the text that became final, and whether a stop string ended
    /// the text (the returned text is then everything before it, and nothing more follows).
    public mutating func add(_ token: Int) throws(EngineError) -> (text: String, stopped: Bool) {
        do {
            text += try decoder.add(token)
        } catch {
            throw .undecodableToken(id: token, detail: "\(error)")
        }
        let text = self.text
        if let stop = stopStrings.compactMap({ s in text.firstRange(of: s) }).min(by: { $0.lowerBound < $1.lowerBound }) {
            self.text = ""
            return (String(text[..<stop.lowerBound]), true)
        }
        return (release(keeping: holdBack), false)
    }

    /// The rest of the text, when generation ended other than at a stop string.
    public mutating func finish() -> String {
        text += decoder.flush()
        return release(keeping: 0)
    }

    private mutating func release(keeping keep: Int) -> String {
        guard text.count > keep else { return "" }
        let cut = text.index(text.endIndex, offsetBy: -keep)
        defer { text.removeSubrange(..<cut) }
        return String(text[..<cut])
    }
}
