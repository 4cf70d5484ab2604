import Engine
import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import OpenAICompatible
import ServiceLifecycle
import Synchronization

/// What `strun serve` needs to serve a model: a generator, and what clients are told about it.
public struct LoadedModel: Sendable {
    public let generator: BatchGenerator
    public let served: ServedModel

    public init(generator: BatchGenerator, served: ServedModel) {
        self.generator = generator
        self.served = served
    }
}

/// How the server listens and what it accepts.
public struct ServerConfiguration: Sendable {
    public var host = "127.0.0.1"
    /// 0: a free port the system chooses (printed when listening).
    public var port = 8080
    /// With a key, every endpoint but `/health` needs `Authorization: Bearer KEY`.
    public var apiKey: String?
    /// Largest request body accepted (413 beyond).
    public var maximumBodyBytes = 1 << 20
    /// Connections open at once at most; past that new ones wait in the listen backlog.
    public var maximumConnections = 256
    /// On SIGINT/SIGTERM, running generations may finish for this long; then they are cut.
    public var shutdownGracePeriod = 10.0
    /// Seconds a client is asked to wait (`Retry-After`) when the queue is full.
    public var retryAfterSeconds = 1

    public init() {}
}

/// strun's HTTP server: the OpenAI-compatible API, llama-server's `/health`, `/tokenize` and
/// `/detokenize`, and Prometheus metrics, on Hummingbird. It listens at once and loads the model
/// in the background (`/health` answers 503 until it is ready); SIGINT and SIGTERM stop it
/// gracefully.
public struct ModelServer: Sendable {
    public let configuration: ServerConfiguration
    private let load: @Sendable () throws -> LoadedModel
    private let state: ServerState

    /// - Parameter load: loads the model (called once, off the server's threads).
    public init(configuration: ServerConfiguration, load: @escaping @Sendable () throws -> LoadedModel) {
        self.configuration = configuration
        self.load = load
        state = ServerState(configuration: configuration)
    }

    /// Serves until SIGINT or SIGTERM (then returns once running generations have finished or
    /// been cut), or throws when the model cannot be loaded or the address cannot be bound.
    /// `listening` is called with the bound host and port.
    public func run(listening: @escaping @Sendable (String, Int) -> Void) async throws {
        var logger = Logger(label: "strun.serve")
        logger.logLevel = ProcessInfo.processInfo.environment["STRUN_LOG_LEVEL"].flatMap(Logger.Level.init(rawValue:)) ?? .warning
        let router = Routes(state: state, configuration: configuration).router()
        let http = ApplicationConfiguration(
            address: .hostname(configuration.host, port: configuration.port), serverName: "strun",
            availableConnectionsDelegate: MaximumAvailableConnections(configuration.maximumConnections))
        let app = Application(
            router: router,
            server: .http1(configuration: .init(additionalChannelHandlers: [DisconnectWatcher()], idleTimeout: .seconds(120))),
            configuration: http,
            onServerRunning: { channel in listening(configuration.host, channel.localAddress?.port ?? configuration.port) },
            logger: logger)
        // Shut down in reverse order: the loader first (it stops the generator, which lets running
        // generations go on for the grace period), then the HTTP server (it stops accepting and
        // waits for the requests in flight). A load that fails shuts the server down the same way.
        let loader = LoaderService(state: state, load: load, grace: configuration.shutdownGracePeriod)
        let group = ServiceGroup(
            configuration: .init(
                services: [
                    .init(service: app),
                    .init(service: loader, successTerminationBehavior: .ignore, failureTerminationBehavior: .gracefullyShutdownGroup)
                ],
                gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}

/// The server's model, once loaded, and whether it is stopping.
final class ServerState: Sendable {
    enum Phase {
        case loading
        case ready(LoadedModel)
        case stopping
    }

    let configuration: ServerConfiguration
    let metrics = ServerMetrics()
    private let phase = Mutex<Phase>(.loading)

    init(configuration: ServerConfiguration) { self.configuration = configuration }

    var model: LoadedModel? {
        phase.withLock { if case .ready(let m) = $0 { m } else { nil } }
    }

    var isStopping: Bool { phase.withLock { if case .stopping = $0 { true } else { false } } }

    /// Makes `model` the one served, unless the server is already stopping (returns false).
    func ready(_ model: LoadedModel) -> Bool {
        phase.withLock { phase in
            if case .stopping = phase { return false }
            phase = .ready(model)
            return true
        }
    }

    /// The model being served when stopping began (its generator is then shut down by the caller).
    func stop() -> LoadedModel? {
        phase.withLock { phase in
            defer { phase = .stopping }
            if case .ready(let m) = phase { return m }
            return nil
        }
    }
}

/// Loads the model beside the HTTP server, then waits; on graceful shutdown, stops the
/// generator, letting running generations go on for the grace period.
private struct LoaderService: Service {
    let state: ServerState
    let load: @Sendable () throws -> LoadedModel
    let grace: Double

    func run() async throws {
        let model = try await Self.offThread(load)
        guard state.ready(model) else {
            await Self.offThread { model.generator.shutdown() }
            return
        }
        try? await gracefulShutdown()
        _ = state.stop()
        let grace = self.grace
        Thread.detachNewThread { model.generator.shutdown(gracePeriod: grace) }
    }

    /// Runs blocking work on a thread of its own, not the concurrency pool's.
    static func offThread<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            Thread.detachNewThread { continuation.resume(with: Result { try work() }) }
        }
    }

    static func offThread(_ work: @escaping @Sendable () -> Void) async {
        await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                work()
                continuation.resume()
            }
        }
    }
}
