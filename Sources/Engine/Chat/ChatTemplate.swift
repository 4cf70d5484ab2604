/// One turn of a conversation.
public struct ChatMessage: Sendable, Equatable {
    public var role: String
    public var content: String
    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}

/// ChatML, as SmallThinker is trained on: each turn is `<|im_start|>{role}\n{content}<|im_end|>\n`,
/// and a prompt for the assistant ends with `<|im_start|>assistant\n`.
public enum ChatTemplate {
    public static let defaultSystemPrompt = "You are a helpful assistant."
    public static let turnStart = "<|im_start|>"
    public static let turnEnd = "<|im_end|>"
    public static let endOfText = "<|endoftext|>"

    public static func turn(_ message: ChatMessage) -> String {
        "\(turnStart)\(message.role)\n\(message.content)\(turnEnd)\n"
    }

    public static let assistantPrompt = "\(turnStart)assistant\n"

    /// The whole prompt: every message, then the assistant's opening.
    public static func render(_ messages: [ChatMessage], addGenerationPrompt: Bool = true) -> String {
        messages.map(turn).joined() + (addGenerationPrompt ? assistantPrompt : "")
    }

    /// A one-shot prompt: optional system message, the user's text, the assistant's opening.
    public static func prompt(user: String, system: String? = defaultSystemPrompt) -> String {
        var messages: [ChatMessage] = []
        if let system { messages.append(ChatMessage(role: "system", content: system)) }
        messages.append(ChatMessage(role: "user", content: user))
        return render(messages)
    }
}
