import Engine
import Format

/// What the server knows of the model it serves, for checking requests and writing responses.
public struct ServedModel: Sendable {
    /// The name clients use (`model` in requests); the package's file name without `.stpk` unless
    /// the server was told another.
    public var id: String
    /// Positions each request can hold, prompt included.
    public var contextLength: Int
    /// Token ids are below this.
    public var vocabularySize: Int
    /// Sampling for the parameters a request leaves out (the package's generation_config.json).
    public var defaults: SamplingParameters
    /// Unix time the server loaded the model.
    public var created: Int

    public init(id: String, contextLength: Int, vocabularySize: Int, defaults: SamplingParameters, created: Int) {
        self.id = id
        self.contextLength = contextLength
        self.vocabularySize = vocabularySize
        self.defaults = defaults
        self.created = created
    }
}

/// A checked `/v1/chat/completions` or `/v1/completions` request.
public struct CompletionRequest: Sendable {
    public enum Endpoint: Sendable { case chat, completion }

    public var endpoint: Endpoint
    public var generation: GenerationRequest
    public var stream: Bool
    /// `stream_options.include_usage`: a last chunk with the usage and no choices.
    public var includeUsage: Bool
    /// Whether log-probabilities were asked for (the number of alternatives is in `generation`).
    public var logprobs: Bool
    /// The seed used (the request's, else one drawn for it).
    public var seed: UInt64
}

/// Limits on what one request may ask for, beyond the context.
public enum RequestLimits {
    /// Stop strings per request.
    public static let stopStrings = 16
    /// Bytes per stop string.
    public static let stopStringBytes = 1024
    /// Entries of `logit_bias`.
    public static let logitBias = 1024
    /// Messages of a chat request.
    public static let messages = 4096
    /// Ids of a /detokenize request or a token prompt (besides the context).
    public static let tokens = 1 << 20
}

/// Parses and checks request bodies. Every error is an `APIError` (400 unless said otherwise)
/// naming the field at fault; nothing here trusts a length or a type it has not checked.
public enum RequestParser {
    /// The body as a JSON object.
    public static func object(_ body: [UInt8]) throws(APIError) -> JSONObject {
        guard String(validating: body, as: UTF8.self) != nil else {
            throw .invalid("The request body is not valid UTF-8.", code: "invalid_utf8")
        }
        let value: JSONValue
        do {
            value = try JSONParser.parse(body)
        } catch {
            throw .invalid("The request body is not valid JSON: \(error.description).", code: "invalid_json")
        }
        guard let object = value.objectValue else { throw .invalid("The request body must be a JSON object.", code: "invalid_json") }
        return object
    }

    /// A `/v1/chat/completions` body.
    public static func chat(_ body: [UInt8], model: ServedModel, randomSeed: () -> UInt64) throws(APIError) -> CompletionRequest {
        let fields = Fields(try object(body))
        guard let list = try fields.array("messages") else { throw .invalid("'messages' is required.", param: "messages") }
        guard !list.isEmpty else { throw .invalid("'messages' must not be empty.", param: "messages") }
        guard list.count <= RequestLimits.messages else {
            throw .invalid("'messages' has \(list.count) entries; at most \(RequestLimits.messages) are accepted.", param: "messages")
        }
        var messages: [ChatMessage] = []
        for (i, item) in list.enumerated() { messages.append(try message(item, param: "messages[\(i)]")) }
        if let tools = fields.raw("tools"), tools != .null, tools != .array([]) {
            throw .invalid("Tool calls are not supported.", param: "tools", code: "unsupported_parameter")
        }
        if let functions = fields.raw("functions"), functions != .null, functions != .array([]) {
            throw .invalid("Function calls are not supported.", param: "functions", code: "unsupported_parameter")
        }
        var logprobs = try fields.bool("logprobs") ?? false
        let top = try fields.int("top_logprobs", in: 0...TokenLogprob.maximumAlternatives)
        if top != nil && !logprobs {
            throw .invalid("'top_logprobs' needs 'logprobs' to be true.", param: "top_logprobs")
        }
        if let format = try fields.object("response_format"), let type = format["type"], type != .string("text") {
            throw .invalid("Only a 'response_format' of type 'text' is supported.", param: "response_format", code: "unsupported_parameter")
        }
        logprobs = logprobs || top != nil
        return try common(
            fields, endpoint: .chat, prompt: .chat(messages), logprobs: logprobs ? (top ?? 0) : nil, model: model,
            randomSeed: randomSeed)
    }

    /// A `/v1/completions` body.
    public static func completion(_ body: [UInt8], model: ServedModel, randomSeed: () -> UInt64) throws(APIError) -> CompletionRequest {
        let fields = Fields(try object(body))
        guard let raw = fields.raw("prompt") else { throw .invalid("'prompt' is required.", param: "prompt") }
        let prompt: GenerationRequest.Prompt
        switch raw {
        case .string(let text):
            prompt = .text(text)
        case .array(let items):
            if items.count == 1, case .string(let text) = items[0] {
                prompt = .text(text)
            } else if items.count == 1, case .array(let ids) = items[0] {
                prompt = .tokens(try tokens(ids, param: "prompt[0]", vocabulary: model.vocabularySize))
            } else if items.allSatisfy({ if case .number = $0 { true } else { false } }) {
                prompt = .tokens(try tokens(items, param: "prompt", vocabulary: model.vocabularySize))
            } else if items.count > 1 && items.allSatisfy({ $0.stringValue != nil || $0.arrayValue != nil }) {
                throw .invalid("Only one prompt per request is supported; send one request per prompt.", param: "prompt")
            } else {
                throw .invalid("'prompt' must be a string, an array of token ids, or an array holding one of those.", param: "prompt")
            }
        default:
            throw .invalid("'prompt' must be a string, an array of token ids, or an array holding one of those.", param: "prompt")
        }
        if try fields.bool("echo") == true { throw .invalid("'echo' is not supported.", param: "echo", code: "unsupported_parameter") }
        if let suffix = try fields.string("suffix"), !suffix.isEmpty {
            throw .invalid("'suffix' is not supported.", param: "suffix", code: "unsupported_parameter")
        }
        if let best = try fields.int("best_of", in: 1...Int.max), best != 1 {
            throw .invalid("Only 'best_of' 1 is supported.", param: "best_of", code: "unsupported_parameter")
        }
        let logprobs = try fields.int("logprobs", in: 0...TokenLogprob.maximumAlternatives)
        return try common(fields, endpoint: .completion, prompt: prompt, logprobs: logprobs, model: model, randomSeed: randomSeed)
    }

    /// The parameters both endpoints share.
    private static func common(
        _ fields: Fields, endpoint: CompletionRequest.Endpoint, prompt: GenerationRequest.Prompt, logprobs: Int?, model: ServedModel,
        randomSeed: () -> UInt64
    ) throws(APIError) -> CompletionRequest {
        if let name = try fields.string("model"), name != model.id {
            throw .invalid("The model '\(name)' does not exist; this server serves '\(model.id)'.", param: "model", code: "model_not_found")
        }
        if let n = try fields.int("n", in: Int.min...Int.max), n != 1 {
            throw .invalid("Only 'n' 1 is supported; send \(n) requests instead.", param: "n", code: "unsupported_parameter")
        }
        var sampling = model.defaults
        if let t = try fields.double("temperature", in: 0...2) { sampling.temperature = Float(t) }
        if let p = try fields.double("top_p", in: 0...1) {
            guard p > 0 else { throw .invalid("'top_p' must be greater than 0.", param: "top_p") }
            sampling.topP = Float(p)
        }
        if let k = try fields.int("top_k", in: 0...Int.max) { sampling.topK = k }
        if let m = try fields.double("min_p", in: 0...1) { sampling.minP = Float(m) }
        if let f = try fields.double("frequency_penalty", in: -2...2) { sampling.frequencyPenalty = Float(f) }
        if let p = try fields.double("presence_penalty", in: -2...2) { sampling.presencePenalty = Float(p) }
        for name in ["repetition_penalty", "repeat_penalty"] {
            if let r = try fields.double(name, in: 0...10) {
                guard r > 0 else { throw .invalid("'\(name)' must be greater than 0.", param: name) }
                sampling.repetitionPenalty = Float(r)
            }
        }
        if let bias = try fields.object("logit_bias") {
            guard bias.count <= RequestLimits.logitBias else {
                throw .invalid("'logit_bias' has \(bias.count) entries; at most \(RequestLimits.logitBias).", param: "logit_bias")
            }
            for (key, value) in bias.entries {
                guard let id = Int(key), (0..<model.vocabularySize).contains(id) else {
                    throw .invalid(
                        "'logit_bias' keys must be token ids below \(model.vocabularySize); '\(key)' is not.", param: "logit_bias")
                }
                guard let b = value.doubleValue, b.isFinite, (-100...100).contains(b) else {
                    throw .invalid("'logit_bias' values must be numbers from -100 to 100.", param: "logit_bias.\(key)")
                }
                sampling.logitBias[id] = Float(b)
            }
        }
        let seed: UInt64
        if let s = try fields.int("seed", in: Int.min...Int.max) { seed = UInt64(bitPattern: Int64(s)) } else { seed = randomSeed() }
        sampling.seed = seed
        var maximumTokens = model.contextLength
        for name in ["max_tokens", "max_completion_tokens", "n_predict"] {
            if let m = try fields.int(name, in: Int.min...Int.max) {
                guard m >= 1 else { throw .invalid("'\(name)' must be at least 1, not \(m).", param: name, code: "invalid_value") }
                maximumTokens = min(m, model.contextLength)
            }
        }
        var stops: [String] = []
        switch fields.raw("stop") {
        case nil, .null?: break
        case .string(let s)?: stops = [s]
        case .array(let items)?:
            for (i, item) in items.enumerated() {
                guard let s = item.stringValue else {
                    throw .invalid("'stop' must be a string or an array of strings.", param: "stop[\(i)]")
                }
                stops.append(s)
            }
        default: throw .invalid("'stop' must be a string or an array of strings.", param: "stop")
        }
        guard stops.count <= RequestLimits.stopStrings else {
            throw .invalid("'stop' has \(stops.count) strings; at most \(RequestLimits.stopStrings).", param: "stop")
        }
        if let long = stops.first(where: { $0.utf8.count > RequestLimits.stopStringBytes }) {
            throw .invalid("A stop string has \(long.utf8.count) bytes; at most \(RequestLimits.stopStringBytes).", param: "stop")
        }
        let stream = try fields.bool("stream") ?? false
        var includeUsage = false
        if let options = try fields.object("stream_options") {
            guard stream else { throw .invalid("'stream_options' needs 'stream' to be true.", param: "stream_options") }
            let nested = Fields(options, prefix: "stream_options.")
            includeUsage = try nested.bool("include_usage") ?? false
        }
        let ignoreEOS = try fields.bool("ignore_eos") ?? false
        let generation = GenerationRequest(
            prompt: prompt, sampling: sampling, maximumTokens: maximumTokens, stopStrings: stops, ignoreEndOfSequence: ignoreEOS,
            logprobs: logprobs)
        return CompletionRequest(
            endpoint: endpoint, generation: generation, stream: stream, includeUsage: includeUsage, logprobs: logprobs != nil,
            seed: seed)
    }

    /// One chat message: `role` and `content` (a string, or text parts).
    private static func message(_ value: JSONValue, param: String) throws(APIError) -> ChatMessage {
        guard let object = value.objectValue else { throw .invalid("Each message must be an object.", param: param) }
        let fields = Fields(object, prefix: param + ".")
        guard let role = try fields.string("role") else { throw .invalid("'\(param).role' is required.", param: param + ".role") }
        let roles = ["system", "developer", "user", "assistant"]
        guard roles.contains(role) else {
            throw .invalid(
                "'\(param).role' must be one of \(roles.map { "'\($0)'" }.joined(separator: ", ")); '\(role)' is not supported.",
                param: param + ".role")
        }
        let content: String
        switch fields.raw("content") {
        case .string(let text)?:
            content = text
        case .null?, nil:
            guard role == "assistant" else { throw .invalid("'\(param).content' is required.", param: param + ".content") }
            content = ""
        case .array(let parts)?:
            var text = ""
            for (i, part) in parts.enumerated() {
                let at = "\(param).content[\(i)]"
                guard let object = part.objectValue else { throw .invalid("Each content part must be an object.", param: at) }
                let partFields = Fields(object, prefix: at + ".")
                guard try partFields.string("type") == "text" else {
                    throw .invalid("Only text content parts are supported.", param: at + ".type", code: "unsupported_content")
                }
                guard let piece = try partFields.string("text") else { throw .invalid("'\(at).text' is required.", param: at + ".text") }
                text += piece
            }
            content = text
        default:
            throw .invalid("'\(param).content' must be a string or an array of text parts.", param: param + ".content")
        }
        return ChatMessage(role: role == "developer" ? "system" : role, content: content)
    }

    /// Token ids, each checked against the vocabulary.
    static func tokens(_ items: [JSONValue], param: String, vocabulary: Int) throws(APIError) -> [Int] {
        guard items.count <= RequestLimits.tokens else {
            throw .invalid("'\(param)' has \(items.count) ids; at most \(RequestLimits.tokens).", param: param)
        }
        var ids: [Int] = []
        ids.reserveCapacity(items.count)
        for (i, item) in items.enumerated() {
            guard let id = item.intValue, (0..<vocabulary).contains(id) else {
                throw .invalid(
                    "'\(param)[\(i)]' must be a token id from 0 to \(vocabulary - 1).", param: "\(param)[\(i)]", code: "invalid_token")
            }
            ids.append(id)
        }
        return ids
    }

    /// `/tokenize`: `{"content": text, "with_pieces": bool}` (llama-server's shape).
    public static func tokenize(_ body: [UInt8]) throws(APIError) -> (content: String, withPieces: Bool) {
        let fields = Fields(try object(body))
        guard let content = try fields.string("content") else { throw .invalid("'content' is required.", param: "content") }
        return (content, try fields.bool("with_pieces") ?? false)
    }

    /// `/detokenize`: `{"tokens": [ids]}`.
    public static func detokenize(_ body: [UInt8], vocabulary: Int) throws(APIError) -> [Int] {
        let fields = Fields(try object(body))
        guard let items = try fields.array("tokens") else { throw .invalid("'tokens' is required.", param: "tokens") }
        return try tokens(items, param: "tokens", vocabulary: vocabulary)
    }
}

/// An object's fields, read with their types checked; a field set to null reads as absent.
struct Fields {
    let object: JSONObject
    let prefix: String

    init(_ object: JSONObject, prefix: String = "") {
        self.object = object
        self.prefix = prefix
    }

    func raw(_ name: String) -> JSONValue? { object[name] }

    private func value(_ name: String) -> JSONValue? {
        guard let v = object[name], v != .null else { return nil }
        return v
    }

    private func wrong(_ name: String, _ what: String) -> APIError {
        .invalid("'\(prefix)\(name)' must be \(what).", param: prefix + name, code: "invalid_type")
    }

    /// The field as `read` gives it; an error saying it must be `what` when `read` gives nil.
    private func typed<T>(_ name: String, _ what: String, as read: (JSONValue) -> T?) throws(APIError) -> T? {
        guard let v = value(name) else { return nil }
        guard let typed = read(v) else { throw wrong(name, what) }
        return typed
    }

    func string(_ name: String) throws(APIError) -> String? { try typed(name, "a string") { $0.stringValue } }
    func bool(_ name: String) throws(APIError) -> Bool? { try typed(name, "true or false") { $0.boolValue } }
    func array(_ name: String) throws(APIError) -> [JSONValue]? { try typed(name, "an array") { $0.arrayValue } }
    func object(_ name: String) throws(APIError) -> JSONObject? { try typed(name, "an object") { $0.objectValue } }

    func int(_ name: String, in range: ClosedRange<Int>) throws(APIError) -> Int? {
        guard let i = try typed(name, "an integer", as: { $0.intValue }) else { return nil }
        guard range.contains(i) else { throw outside(name, range.lowerBound, range.upperBound, i) }
        return i
    }

    func double(_ name: String, in range: ClosedRange<Double>) throws(APIError) -> Double? {
        guard let d = try typed(name, "a number", as: { $0.doubleValue.flatMap { $0.isFinite ? $0 : nil } }) else { return nil }
        guard range.contains(d) else { throw outside(name, range.lowerBound, range.upperBound, d) }
        return d
    }

    private func outside<T: Comparable>(_ name: String, _ low: T, _ high: T, _ value: T) -> APIError {
        .invalid("'\(prefix)\(name)' must be from \(low) to \(high), not \(value).", param: prefix + name, code: "invalid_value")
    }
}
