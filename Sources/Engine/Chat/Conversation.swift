/// A chat with history: each reply continues the same KV cache, so earlier turns are not
/// recomputed.
public final class Conversation {
    public private(set) var generator: TextGenerator
    public let system: String?
    public private(set) var messages: [ChatMessage] = []
    /// Tokens that close the previous assistant turn, evaluated with the next user turn.
    private var pending: [Int] = []
    private var history: [Int] = []

    public init(generator: TextGenerator, system: String?) {
        self.generator = generator
        self.system = system
    }

    public var session: Session { generator.session }

    /// Forgets the conversation (and the cache).
    public func reset() {
        generator.session.reset()
        messages.removeAll()
        pending.removeAll()
        history.removeAll()
    }

    /// Answers `text`, streaming the reply through `emit`.
    @discardableResult
    public func reply(to text: String, maximumTokens: Int, emit: (String) -> Void) throws(EngineError) -> StopReason {
        let tokenizer = generator.tokenizer
        var prefix = ""
        if session.position == 0, let system { prefix = ChatTemplate.turn(ChatMessage(role: "system", content: system)) }
        let prompt =
            pending + tokenizer.encode(prefix + ChatTemplate.turn(ChatMessage(role: "user", content: text)) + ChatTemplate.assistantPrompt)
        var reply = ""
        let (ids, reason) = try generator.run(prompt: prompt, history: history, maximumTokens: maximumTokens) { piece in
            reply += piece
            emit(piece)
        }
        history += prompt + ids
        messages.append(ChatMessage(role: "user", content: text))
        messages.append(ChatMessage(role: "assistant", content: reply))
        // The last sampled token was never evaluated: a stop token is replaced by the turn's end
        // as the template writes it; any other token is kept before that end.
        let unevaluated = reason == .endOfSequence ? [] : ids.suffix(1)
        pending = Array(unevaluated) + tokenizer.encode(ChatTemplate.turnEnd + "\n")
        return reason
    }
}
