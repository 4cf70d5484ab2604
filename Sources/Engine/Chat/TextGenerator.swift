/// Why generation stopped.
public enum StopReason: String, Sendable {
    case endOfSequence = "end of sequence"
    case stopString = "stop string"
    case maximumTokens = "token limit"
    case contextFull = "context full"
}

/// Runs the sampling loop over a session and streams text: stops at the stop token ids, at a
/// stop string (which is not printed), at the token limit or when the context is full.
public struct TextGenerator {
    public let session: Session
    public let tokenizer: Tokenizer
    public var sampler: Sampler
    public var stopTokens: Set<Int>
    public var stopStrings: [String]

    public init(session: Session, tokenizer: Tokenizer, sampling: SamplingParameters, stopStrings: [String] = []) {
        self.session = session
        self.tokenizer = tokenizer
        sampler = Sampler(sampling)
        var stops = Set(session.model.config.eosTokenIDs)
        for name in [ChatTemplate.turnEnd, ChatTemplate.endOfText] {
            if let id = tokenizer.id(of: name) { stops.insert(id) }
        }
        stopTokens = stops
        self.stopStrings = stopStrings.filter { !$0.isEmpty }
    }

    /// Feeds `prompt` (ids not yet evaluated), then generates up to `maximumTokens`, calling
    /// `emit` with text as it becomes final. Returns the generated ids (the stop token included
    /// when one ended it) and why it stopped.
    public mutating func run(prompt: [Int], history: [Int] = [], maximumTokens: Int,
                             emit: (String) -> Void) throws(EngineError) -> (ids: [Int], reason: StopReason) {
        guard session.position + prompt.count < session.contextLength else { throw .contextFull(limit: session.contextLength) }
        var logits = try session.evaluate(prompt)
        var decoder = StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true)
        var generated: [Int] = []
        var seen = history + prompt
        var text = ""       // decoded, not yet emitted (may be the start of a stop string)
        let holdBack = (stopStrings.map(\.count).max() ?? 1) - 1
        func release(final: Bool) {
            let keep = final ? 0 : holdBack
            if text.count > keep {
                let cut = text.index(text.endIndex, offsetBy: -keep)
                emit(String(text[..<cut]))
                text.removeSubrange(..<cut)
            }
        }
        // Embedding rows past the tokenizer's vocabulary (padding in real checkpoints) have no
        // text: never sample them.
        let speakable = min(tokenizer.vocabularySize, logits.count)
        while generated.count < maximumTokens {
            for i in speakable..<logits.count { logits[i] = -.infinity }
            let next = sampler.sample(logits[...], history: seen)
            generated.append(next)
            seen.append(next)
            if stopTokens.contains(next) {
                text += decoder.flush()
                release(final: true)
                return (generated, .endOfSequence)
            }
            do {
                text += try decoder.add(next)
            } catch {
                throw .invalidRequest("the model produced token \(next), which the tokenizer does not have: \(error)")
            }
            if let stop = stopStrings.compactMap({ s in text.firstRange(of: s).map { (s, $0) } }).min(by: { $0.1.lowerBound < $1.1.lowerBound }) {
                text = String(text[..<stop.1.lowerBound])
                release(final: true)
                return (generated, .stopString)
            }
            release(final: false)
            if generated.count == maximumTokens { break }
            if session.position >= session.contextLength {
                text += decoder.flush()
                release(final: true)
                return (generated, .contextFull)
            }
            logits = try session.evaluate([next])
        }
        text += decoder.flush()
        release(final: true)
        return (generated, .maximumTokens)
    }
}
