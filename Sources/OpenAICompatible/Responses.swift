import Engine
import Format

/// Turns a generation's pieces into the OpenAI API's responses: the chunks of a stream (each the
/// `data:` of one server-sent event) or, at the end, one whole response.
public struct CompletionResponder: Sendable {
    public let request: CompletionRequest
    public let model: ServedModel
    /// `chatcmpl-…` or `cmpl-…`.
    public let id: String
    public let created: Int
    /// A token's bytes (a token can be part of a character), for log-probabilities.
    private let tokenBytes: @Sendable (Int) -> [UInt8]

    /// The text so far, and its log-probabilities.
    public private(set) var text = ""
    private var logprobs: [TokenLogprob] = []
    /// Characters of token text before the next token (completions' `text_offset`).
    private var offset = 0
    private var started = false

    public init(request: CompletionRequest, model: ServedModel, id: String, created: Int, tokenBytes: @escaping @Sendable (Int) -> [UInt8])
    {
        self.request = request
        self.model = model
        self.id = id
        self.created = created
        self.tokenBytes = tokenBytes
    }

    private var isChat: Bool { request.endpoint == .chat }

    public static func finishReason(_ reason: StopReason) -> String {
        switch reason {
        case .endOfSequence, .stopString: "stop"
        case .maximumTokens, .contextFull: "length"
        }
    }

    // MARK: Streaming

    /// The chunks to send for `piece`, serialised (none when it adds nothing a client sees).
    public mutating func chunks(for piece: GenerationPiece) -> [String] {
        var out: [String] = []
        if isChat && !started {
            started = true
            out.append(chunk(delta: [("role", .string("assistant")), ("content", .string(""))], logprobs: nil, finish: nil))
        }
        let entry = piece.logprob.map { [$0] } ?? []
        let logprobs = request.logprobs && !entry.isEmpty ? logprobsJSON(entry) : nil
        text += piece.text
        if !piece.text.isEmpty || logprobs != nil {
            out.append(chunk(delta: [("content", .string(piece.text))], logprobs: logprobs, finish: nil))
        }
        if let summary = piece.finish {
            out.append(chunk(delta: [], logprobs: nil, finish: summary))
            if request.includeUsage { out.append(usageChunk(summary)) }
        }
        return out
    }

    private func chunk(delta: [(String, JSONValue)], logprobs: JSONValue?, finish: GenerationSummary?) -> String {
        var choice: [(String, JSONValue)] = [("index", .int(0))]
        if isChat {
            choice.append(("delta", .object(JSONObject(delta))))
        } else {
            choice.append(("text", delta.first { $0.0 == "content" }?.1 ?? .string("")))
        }
        choice.append(("logprobs", logprobs ?? .null))
        choice.append(("finish_reason", finish.map { .string(Self.finishReason($0.reason)) } ?? .null))
        var object = header(object: isChat ? "chat.completion.chunk" : "text_completion")
        object.append(("choices", .array([.object(JSONObject(choice))])))
        if request.includeUsage { object.append(("usage", .null)) }
        if let finish { object.append(("timings", timings(finish))) }
        return JSONWriter.serialize(.object(JSONObject(object)))
    }

    private func usageChunk(_ summary: GenerationSummary) -> String {
        var object = header(object: isChat ? "chat.completion.chunk" : "text_completion")
        object.append(("choices", .array([])))
        object.append(("usage", usage(summary)))
        return JSONWriter.serialize(.object(JSONObject(object)))
    }

    // MARK: Whole responses

    /// Adds a piece to a response that is sent whole.
    public mutating func add(_ piece: GenerationPiece) {
        text += piece.text
        if let logprob = piece.logprob { logprobs.append(logprob) }
    }

    /// The whole response, once the generation has finished with `summary`.
    public mutating func response(_ summary: GenerationSummary) -> String {
        var choice: [(String, JSONValue)] = [("index", .int(0))]
        if isChat {
            choice.append(("message", .object(JSONObject([("role", .string("assistant")), ("content", .string(text))]))))
        } else {
            choice.append(("text", .string(text)))
        }
        choice.append(("logprobs", request.logprobs ? logprobsJSON(logprobs) : .null))
        choice.append(("finish_reason", .string(Self.finishReason(summary.reason))))
        var object = header(object: isChat ? "chat.completion" : "text_completion")
        object.append(("choices", .array([.object(JSONObject(choice))])))
        object.append(("usage", usage(summary)))
        object.append(("timings", timings(summary)))
        return JSONWriter.serialize(.object(JSONObject(object)))
    }

    // MARK: Parts

    private func header(object: String) -> [(String, JSONValue)] {
        [("id", .string(id)), ("object", .string(object)), ("created", .int(created)), ("model", .string(model.id))]
    }

    private func usage(_ summary: GenerationSummary) -> JSONValue {
        .object(
            JSONObject([
                ("prompt_tokens", .int(summary.promptTokens)), ("completion_tokens", .int(summary.generatedTokens)),
                ("total_tokens", .int(summary.promptTokens + summary.generatedTokens)),
                ("prompt_tokens_details", .object(JSONObject([("cached_tokens", .int(summary.cachedTokens))])))
            ]))
    }

    /// llama-server's `timings`, so front ends written for it show the same figures.
    private func timings(_ summary: GenerationSummary) -> JSONValue {
        let prompt = max(0, summary.timeToFirstToken - summary.queuedSeconds)
        let decoded = max(0, summary.generatedTokens - 1)
        return .object(
            JSONObject([
                ("cache_n", .int(summary.cachedTokens)), ("prompt_n", .int(summary.promptTokens - summary.cachedTokens)),
                ("prompt_ms", number(prompt * 1000)), ("queued_ms", number(summary.queuedSeconds * 1000)),
                ("time_to_first_token_ms", number(summary.timeToFirstToken * 1000)), ("predicted_n", .int(summary.generatedTokens)),
                ("predicted_ms", number(summary.decodeSeconds * 1000)),
                ("predicted_per_second", number(summary.decodeSeconds > 0 ? Double(decoded) / summary.decodeSeconds : 0))
            ]))
    }

    /// Log-probabilities in the endpoint's shape: chat's `{"content": [{token, logprob, bytes,
    /// top_logprobs}]}`, completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.
    private mutating func logprobsJSON(_ entries: [TokenLogprob]) -> JSONValue {
        func piece(_ token: Int) -> (String, [UInt8]) {
            let bytes = tokenBytes(token)
            return (String(decoding: bytes, as: UTF8.self), bytes)
        }
        if isChat {
            let content = entries.map { entry -> JSONValue in
                let (text, bytes) = piece(entry.token)
                let top = entry.alternatives.map { alternative -> JSONValue in
                    let (t, b) = piece(alternative.token)
                    return .object(JSONObject([("token", .string(t)), ("logprob", number(alternative.logprob)), ("bytes", byteArray(b))]))
                }
                return .object(
                    JSONObject([
                        ("token", .string(text)), ("logprob", number(entry.logprob)), ("bytes", byteArray(bytes)),
                        ("top_logprobs", .array(top))
                    ]))
            }
            return .object(JSONObject([("content", .array(content))]))
        }
        var tokens: [JSONValue] = [], values: [JSONValue] = [], tops: [JSONValue] = [], offsets: [JSONValue] = []
        for entry in entries {
            let text = piece(entry.token).0
            tokens.append(.string(text))
            values.append(number(entry.logprob))
            var top = JSONObject()
            for alternative in entry.alternatives {
                let key = piece(alternative.token).0
                if top[key] == nil { top[key] = number(alternative.logprob) }
            }
            tops.append(.object(top))
            offsets.append(.int(offset))
            offset += text.count
        }
        return .object(
            JSONObject([
                ("tokens", .array(tokens)), ("token_logprobs", .array(values)), ("top_logprobs", .array(tops)),
                ("text_offset", .array(offsets))
            ]))
    }

    private func byteArray(_ bytes: [UInt8]) -> JSONValue { .array(bytes.map { .int(Int($0)) }) }
}

/// A JSON number for any float: OpenAI's floor of -9999 for a log-probability of minus infinity
/// (JSON has no infinities), and 0 for NaN.
func number(_ x: Double) -> JSONValue {
    x.isNaN ? .double(0) : .double(min(max(x, -9999), 1e30))
}

/// A float's shortest decimal form (-0.1, not -0.10000000149011612).
func number(_ x: Float) -> JSONValue { number(x.isFinite ? Double("\(x)") ?? Double(x) : Double(x)) }

/// The bodies of the endpoints that do not generate.
public enum Listings {
    /// `GET /v1/models`.
    public static func models(_ model: ServedModel, parallel: Int) -> String {
        let entry = JSONObject([
            ("id", .string(model.id)), ("object", .string("model")), ("created", .int(model.created)), ("owned_by", .string("strun")),
            (
                "meta",
                .object(
                    JSONObject([
                        ("context_length", .int(model.contextLength)), ("vocabulary_size", .int(model.vocabularySize)),
                        ("parallel", .int(parallel))
                    ]))
            )
        ])
        return JSONWriter.serialize(.object(JSONObject([("object", .string("list")), ("data", .array([.object(entry)]))])))
    }

    /// `POST /tokenize`: the ids, or with pieces `[{"id", "piece"}]` (llama-server's shape; a
    /// piece that is not whole UTF-8 is given as its bytes).
    public static func tokens(_ ids: [Int], pieces: Bool, tokenBytes: (Int) -> [UInt8]) -> String {
        let items: [JSONValue] = ids.map { id in
            guard pieces else { return .int(id) }
            let bytes = tokenBytes(id)
            let piece: JSONValue = String(validating: bytes, as: UTF8.self).map(JSONValue.string) ?? .array(bytes.map { .int(Int($0)) })
            return .object(JSONObject([("id", .int(id)), ("piece", piece)]))
        }
        return JSONWriter.serialize(.object(JSONObject([("tokens", .array(items))])))
    }

    /// `POST /detokenize`.
    public static func content(_ text: String) -> String {
        JSONWriter.serialize(.object(JSONObject([("content", .string(text))])))
    }
}
