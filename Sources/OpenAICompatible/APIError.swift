import Format

/// An error as the OpenAI API reports it: an HTTP status and
/// `{"error": {"message", "type", "param", "code"}}`.
public struct APIError: Error, Sendable, Equatable, CustomStringConvertible {
    public var status: Int
    public var message: String
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, `server_error`, …
    public var type: String
    /// The request field at fault, when there is one (`messages[1].content`, `max_tokens`).
    public var param: String?
    public var code: String?
    /// Seconds a client should wait before trying again (the `Retry-After` header), if any.
    public var retryAfter: Int?

    public init(status: Int, message: String, type: String, param: String? = nil, code: String? = nil, retryAfter: Int? = nil) {
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retryAfter = retryAfter
    }

    /// 400: the request is wrong.
    public static func invalid(_ message: String, param: String? = nil, code: String? = nil) -> APIError {
        APIError(status: 400, message: message, type: "invalid_request_error", param: param, code: code)
    }

    public var description: String { "\(status) \(type): \(message)" }

    public var json: JSONValue {
        .object(
            JSONObject([
                (
                    "error",
                    .object(
                        JSONObject([
                            ("message", .string(message)), ("type", .string(type)), ("param", param.map(JSONValue.string) ?? .null),
                            ("code", code.map(JSONValue.string) ?? .null)
                        ]))
                )
            ]))
    }

    public var body: String { JSONWriter.serialize(json) }
}
