import ArgumentParser
import Engine
import Format
import Foundation
import OpenAICompatible
import Server

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract:
            "Serve the model over HTTP: a chat page at /, the OpenAI API (chat, completions, models), /health, /metrics, /tokenize, "
            + "/detokenize.",
        discussion: """
            Requests share each forward step: up to --parallel generate at once, the others wait in a queue of --queue (503 with \
            Retry-After past it). A request whose prompt begins with what a free sequence holds (the next turn of a chat) evaluates \
            only the rest. Listens on 127.0.0.1 unless told otherwise; --port 0 takes a free port. Prints "listening on URL" once \
            it accepts connections; /health answers 503 until the model is loaded. SIGINT or SIGTERM stop it: running \
            generations get --shutdown-grace seconds to finish, then are cut, and it exits 0.
            """
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Option(help: "Address to listen on (0.0.0.0: every interface; then use an API key).")
    var host = "127.0.0.1"

    @Option(help: "Port to listen on (0: a free one, printed).")
    var port = 8080

    @Option(name: [.customLong("np", withSingleDash: true), .long], help: "Requests that generate at once (sequences sharing each step).")
    var parallel = 4

    @Option(help: "Requests that may wait for a sequence; past that a request gets 503.")
    var queue = 64

    @Option(help: "Require 'Authorization: Bearer KEY' on every endpoint but /health and the chat page (which asks for it).")
    var apiKey: String?

    @Option(help: "Read the API key from this file (its first line).")
    var apiKeyFile: String?

    @Option(help: "The model's name in the API (default: the package's file name without .stpk).")
    var alias: String?

    @Option(help: "Largest request body in bytes.")
    var maxBody = 1 << 20

    @Option(help: "Seconds running generations may go on after SIGINT/SIGTERM before they are cut.")
    var shutdownGrace = 10.0

    @Flag(help: "Evaluate every prompt in full (no reuse of what a free sequence holds): for comparisons.")
    var noPromptCache = false

    @Option(help: "Use this tokenizer.json instead of the package's.")
    var tokenizer: String?

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if parallel < 1 { throw ValidationError("--parallel must be at least 1") }
        if queue < 0 { throw ValidationError("--queue must not be negative") }
        if !(0...65535).contains(port) { throw ValidationError("--port must be from 0 to 65535") }
        if apiKey != nil && apiKeyFile != nil { throw ValidationError("give --api-key or --api-key-file, not both") }
        if maxBody < 1024 { throw ValidationError("--max-body must be at least 1024") }
        if !(shutdownGrace >= 0) { throw ValidationError("--shutdown-grace must not be negative") }
    }

    func run() async throws {
        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.maximumBodyBytes = maxBody
        configuration.shutdownGracePeriod = shutdownGrace
        try reportingErrors {
            if let apiKeyFile {
                let bytes = try FileSystem.readAll(apiKeyFile, limit: 1 << 16)
                let key = String(decoding: bytes, as: UTF8.self).split(whereSeparator: \.isNewline).first.map(String.init) ?? ""
                guard !key.trimmingCharacters(in: .whitespaces).isEmpty else {
                    throw ValidationError("--api-key-file: \(apiKeyFile) has no key on its first line")
                }
                configuration.apiKey = key.trimmingCharacters(in: .whitespaces)
            } else if let apiKey {
                guard !apiKey.isEmpty else { throw ValidationError("--api-key must not be empty") }
                configuration.apiKey = apiKey
            }
        }
        let name = alias ?? URL(fileURLWithPath: package).deletingPathExtension().lastPathComponent
        let (package, runtime, parallel, queue, tokenizerPath, promptCache) = (
            self.package, self.runtime, self.parallel, self.queue, self.tokenizer, !noPromptCache
        )
        let server = ModelServer(configuration: configuration) {
            let model = try runtime.model(package)
            let tokenizer = try loadTokenizer(package: model.package, override: tokenizerPath)
            let session = try runtime.session(model: model, sequences: parallel)
            let generator = BatchGenerator(session: session, tokenizer: tokenizer, maximumWaiting: queue, promptCache: promptCache)
            let served = ServedModel(
                id: name, contextLength: session.contextLength, vocabularySize: model.config.vocabSize,
                defaults: SamplingParameters.defaults(generationConfig: model.package.fileContents("generation_config.json")),
                created: Int(Date().timeIntervalSince1970))
            writeStandardError(
                "strun serve: \(name) loaded: \(parallel) sequences of \(session.contextLength) tokens, \(session.threads) threads"
                    + (session.expertCache.map { ", experts streamed into \(PackageSummary.bytes($0.capacityBytes))" } ?? "") + "\n")
            return LoadedModel(generator: generator, served: served)
        }
        do {
            try await server.run { host, port in
                print("strun serve: listening on http://\(host.contains(":") ? "[\(host)]" : host):\(port)")
                fflush(nil)
            }
        } catch {
            writeStandardError("strun: error: \(Self.describe(error))\n")
            throw ExitCode(1)
        }
        writeStandardError("strun serve: stopped\n")
    }

    static func describe(_ error: any Error) -> String {
        if let error = error as? any ReportableError { return error.description }
        return "\(error)"
    }
}
