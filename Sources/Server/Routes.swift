import Engine
import Foundation
import Hummingbird
import NIOCore
import OpenAICompatible
import Synchronization

/// The endpoints. Handlers turn every failure into an OpenAI-shaped error response; nothing a
/// client sends can throw past them.
struct Routes: Sendable {
    let state: ServerState
    let configuration: ServerConfiguration

    func router() -> Router<ServerContext> {
        let router = Router(context: ServerContext.self)
        router.add(middleware: Gatekeeper(state: state, apiKey: configuration.apiKey))
        router.get("/health") { _, _ in
            await answering { () async throws(APIError) in
                _ = try require()
                return json(#"{"status":"ok"}"#)
            }
        }
        router.get("/") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/html; charset=utf-8"
            headers[.cacheControl] = "no-cache"
            headers[.contentSecurityPolicy] =
                "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; frame-ancestors 'none'"
            headers[.xContentTypeOptions] = "nosniff"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: ChatPage.html)))
        }
        router.get("/metrics") { _, _ in
            var headers = HTTPFields()
            headers[.contentType] = "text/plain; version=0.0.4; charset=utf-8"
            return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: state.metrics.scrape(state.model))))
        }
        for path in ["/v1/models", "/models"] {
            router.get(RouterPath(path)) { _, _ in
                await answering { () async throws(APIError) in
                    let model = try require()
                    return json(Listings.models(model.served, parallel: model.generator.parallel))
                }
            }
        }
        for path in ["/v1/chat/completions", "/chat/completions"] {
            router.post(RouterPath(path)) { request, context in await complete(request, context, endpoint: .chat) }
        }
        for path in ["/v1/completions", "/completions"] {
            router.post(RouterPath(path)) { request, context in await complete(request, context, endpoint: .completion) }
        }
        router.post("/tokenize") { request, _ in
            await answering { () async throws(APIError) in
                let model = try require()
                let (content, pieces) = try RequestParser.tokenize(try await body(request))
                let tokenizer = model.generator.tokenizer
                return json(Listings.tokens(tokenizer.encode(content), pieces: pieces) { tokenizer.bytes(of: $0) ?? [] })
            }
        }
        router.post("/detokenize") { request, _ in
            await answering { () async throws(APIError) in
                let model = try require()
                let ids = try RequestParser.detokenize(try await body(request), vocabulary: model.served.vocabularySize)
                let tokenizer = model.generator.tokenizer
                guard let text = try? tokenizer.decode(ids.filter { $0 < tokenizer.vocabularySize }) else {
                    throw .invalid("The ids do not decode to text.", param: "tokens")
                }
                return json(Listings.content(text))
            }
        }
        return router
    }

    // MARK: Endpoints

    private func complete(_ request: Request, _ context: ServerContext, endpoint: CompletionRequest.Endpoint) async -> Response {
        await answering { () async throws(APIError) in
            let model = try require()
            let bytes = try await body(request)
            var parsed: CompletionRequest
            switch endpoint {
            case .chat: parsed = try RequestParser.chat(bytes, model: model.served) { UInt64.random(in: .min ... .max) }
            case .completion: parsed = try RequestParser.completion(bytes, model: model.served) { UInt64.random(in: .min ... .max) }
            }
            // Tokenised once, here, so that a prompt that does not fit is refused with its count.
            let prompt = model.generator.promptTokens(parsed.generation.prompt)
            guard !prompt.isEmpty else { throw .invalid("The prompt is empty.", param: endpoint == .chat ? "messages" : "prompt") }
            guard prompt.count < model.served.contextLength else {
                throw .invalid(
                    "The prompt has \(prompt.count) tokens; the context holds \(model.served.contextLength), "
                        + "with room for at least one generated token.",
                    param: endpoint == .chat ? "messages" : "prompt", code: "context_length_exceeded")
            }
            parsed.generation.prompt = .tokens(prompt)
            let tokenizer = model.generator.tokenizer
            let responder = CompletionResponder(
                request: parsed, model: model.served, id: (endpoint == .chat ? "chatcmpl-" : "cmpl-") + Self.randomID(),
                created: Int(Date().timeIntervalSince1970), tokenBytes: { tokenizer.bytes(of: $0) ?? [] })
            let pieces = Pieces(model.generator.generate(parsed.generation))
            let stream = parsed.stream, retryAfter = configuration.retryAfterSeconds
            // Until a response is being written, a client that goes away is noticed only by its
            // connection closing (see `DisconnectWatcher`): that cancels the wait, and so the
            // generation. The first piece comes once the request has a sequence and its prompt is
            // evaluated: a full queue or a shut-down generator is still an HTTP error, not a
            // broken stream.
            let waiting = Task { () async throws -> Response in
                let first: GenerationPiece
                do {
                    guard let piece = try await pieces.next() else { throw Self.gone }
                    first = piece
                } catch {
                    throw Self.apiError(error, retryAfter: retryAfter)
                }
                return stream ? self.stream(first: first, rest: pieces, responder: responder) : try await whole(first, pieces, responder)
            }
            let watcher = try? await context.channel.pipeline.handler(type: DisconnectWatcher.self).get()
            watcher?.watch { waiting.cancel() }
            defer { watcher?.unwatch() }
            do { return try await waiting.value } catch { throw Self.apiError(error, retryAfter: retryAfter) }
        }
    }

    /// What a cancelled wait gives (the client is gone; nobody reads it).
    static let gone = APIError(status: 499, message: "The client closed the connection.", type: "invalid_request_error")

    /// A response sent whole once the generation ends.
    private func whole(_ first: GenerationPiece, _ pieces: Pieces, _ responder: CompletionResponder) async throws(APIError) -> Response {
        var responder = responder
        var piece: GenerationPiece? = first
        do {
            while let current = piece {
                responder.add(current)
                if let summary = current.finish { return json(responder.response(summary)) }
                piece = try await pieces.next()
                if piece == nil { throw Self.gone }
            }
        } catch {
            throw Self.apiError(error, retryAfter: configuration.retryAfterSeconds)
        }
        throw APIError(status: 500, message: "The generation ended without a summary.", type: "server_error")
    }

    /// Server-sent events: a `data:` line per chunk, then `data: [DONE]`. A client that goes away
    /// ends the generation (its stream is dropped, which frees its sequence at the next step).
    private func stream(first: GenerationPiece, rest pieces: Pieces, responder: CompletionResponder) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "text/event-stream; charset=utf-8"
        headers[.cacheControl] = "no-cache"
        let body = ResponseBody { writer in
            var responder = responder
            var piece: GenerationPiece? = first
            do {
                while let current = piece {
                    for chunk in responder.chunks(for: current) { try await writer.write(Self.event(chunk)) }
                    if current.finish != nil { break }
                    piece = try await pieces.next()
                }
            } catch let error where error is EngineError {
                // The generation failed or was cut (shutdown): say so in the stream, then end it.
                let apiError = Self.apiError(error, retryAfter: nil)
                try await writer.write(Self.event(apiError.body))
            }
            pieces.close()
            try await writer.write(Self.event("[DONE]"))
            try await writer.finish(nil)
        }
        return Response(status: .ok, headers: headers, body: body)
    }

    // MARK: Helpers

    private static func event(_ data: String) -> ByteBuffer { ByteBuffer(string: "data: \(data)\n\n") }

    static let loading = APIError(status: 503, message: "Loading model", type: "unavailable_error", code: "loading")
    static let shuttingDown = APIError(
        status: 503, message: "The server is shutting down.", type: "unavailable_error", code: "shutting_down")

    /// The model being served; 503 while it loads and once the server is stopping.
    private func require() throws(APIError) -> LoadedModel {
        if state.isStopping { throw Self.shuttingDown }
        guard let model = state.model else { throw Self.loading }
        return model
    }

    /// The request body, at most `maximumBodyBytes` (413 past that).
    private func body(_ request: Request) async throws(APIError) -> [UInt8] {
        do {
            let buffer = try await request.body.collect(upTo: configuration.maximumBodyBytes)
            return Array(buffer.readableBytesView)
        } catch {
            if error is NIOTooManyBytesError {
                throw APIError(
                    status: 413, message: "The request body is larger than \(configuration.maximumBodyBytes) bytes.",
                    type: "invalid_request_error", code: "request_too_large")
            }
            throw .invalid("The request body could not be read: \(error).")
        }
    }

    private func answering(_ body: () async throws(APIError) -> Response) async -> Response {
        do { return try await body() } catch { return Self.errorResponse(error) }
    }

    private func json(_ text: String) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        return Response(status: .ok, headers: headers, body: .init(byteBuffer: ByteBuffer(string: text)))
    }

    static func errorResponse(_ error: APIError) -> Response {
        var headers = HTTPFields()
        headers[.contentType] = "application/json"
        if let retry = error.retryAfter { headers[.retryAfter] = String(retry) }
        return Response(status: .init(code: error.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: error.body)))
    }

    /// The engine's refusals as API errors: a full queue or a stopping server is 503, a request
    /// the engine cannot take is 400, anything else 500.
    static func apiError(_ error: any Error, retryAfter: Int?) -> APIError {
        if let error = error as? APIError { return error }
        guard let error = error as? EngineError else {
            return APIError(status: 500, message: "\(error)", type: "server_error")
        }
        switch error {
        case .queueFull:
            return APIError(
                status: 503, message: "The server is busy: every sequence is in use and the queue is full. Try again shortly.",
                type: "unavailable_error", code: "queue_full", retryAfter: retryAfter)
        case .shutDown:
            return shuttingDown
        case .inputTooLong, .contextFull:
            return .invalid(error.description, code: "context_length_exceeded")
        case .emptyInput, .invalidToken:
            return .invalid(error.description)
        default:
            return APIError(status: 500, message: error.description, type: "server_error")
        }
    }

    static func randomID() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<3).map { _ in String(generator.next() as UInt64, radix: 16) }.joined()
    }
}

/// The request context: Hummingbird's, with the connection, so that a handler can tell when its
/// client has gone.
struct ServerContext: RequestContext {
    var coreContext: CoreRequestContextStorage
    let channel: any Channel

    init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// Notices a client that has gone while its request is being answered: HTTP clients (browsers,
/// curl, the OpenAI libraries) close their connection when they give up on a request, which the
/// server sees as its input closing (it keeps half-closed connections open) or the connection
/// going. The request being answered is then cancelled, and the connection closed. One per
/// connection; HTTP/1.1 answers one request at a time.
final class DisconnectWatcher: ChannelInboundHandler, RemovableChannelHandler, Sendable {
    typealias InboundIn = Never

    private struct State {
        var cancel: (@Sendable () -> Void)?
        var gone = false
    }
    private let state = Mutex(State())

    /// Calls `cancel` when the client goes (at once if it has gone), until `unwatch`.
    func watch(_ cancel: @escaping @Sendable () -> Void) {
        let gone = state.withLock { state in
            if !state.gone { state.cancel = cancel }
            return state.gone
        }
        if gone { cancel() }
    }

    func unwatch() { state.withLock { $0.cancel = nil } }

    private func clientGone() {
        let cancel = state.withLock { state in
            state.gone = true
            defer { state.cancel = nil }
            return state.cancel
        }
        cancel?()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            clientGone()
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        clientGone()
        context.fireChannelInactive()
    }
}

/// A generation's stream, iterated from one task at a time (the handler, then the response
/// body's writer). Dropping it cancels the generation.
final class Pieces: @unchecked Sendable {
    private var iterator: AsyncThrowingStream<GenerationPiece, any Error>.AsyncIterator?

    init(_ stream: AsyncThrowingStream<GenerationPiece, any Error>) { iterator = stream.makeAsyncIterator() }

    func next() async throws -> GenerationPiece? {
        guard var it = iterator else { return nil }
        defer { iterator = it }
        return try await it.next()
    }

    /// Lets go of the stream (a generation still running is cancelled).
    func close() { iterator = nil }
}

/// Checks the API key (every path but /health and the page), counts every answer by status, and answers
/// anything the routes throw (an unknown path, a bad method) in OpenAI's error shape.
struct Gatekeeper: RouterMiddleware {
    typealias Context = ServerContext
    let state: ServerState
    let apiKey: String?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        let response: Response
        // The page and /health are open: the page holds no secret and asks for the key itself.
        if let apiKey, path != "/health", path != "/", !Self.authorized(request.headers[.authorization], key: apiKey) {
            response = Routes.errorResponse(
                APIError(
                    status: 401, message: "Invalid or missing API key: send 'Authorization: Bearer KEY'.", type: "authentication_error",
                    code: "invalid_api_key"))
        } else {
            do {
                response = try await next(request, context)
            } catch let error as HTTPError {
                let status = Int(error.status.code)
                let message = status == 404 ? "There is no endpoint \(request.method) \(path)." : error.body ?? error.status.reasonPhrase
                response = Routes.errorResponse(
                    APIError(status: status, message: message, type: status == 404 ? "not_found_error" : "invalid_request_error"))
            } catch {
                response = Routes.errorResponse(APIError(status: 500, message: "\(error)", type: "server_error"))
            }
        }
        state.metrics.count(path: path, method: request.method.rawValue, status: Int(response.status.code))
        return response
    }

    /// `Bearer KEY`, compared in time that does not depend on where the texts differ.
    static func authorized(_ header: String?, key: String) -> Bool {
        let given = Array((header ?? "").utf8), expected = Array("Bearer \(key)".utf8)
        var difference = UInt8(given.count == expected.count ? 0 : 1)
        for i in 0..<expected.count { difference |= expected[i] ^ (i < given.count ? given[i] : 0) }
        return difference == 0
    }
}
