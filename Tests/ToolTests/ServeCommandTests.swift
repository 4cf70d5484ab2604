import Foundation
import Testing

/// `strun serve` through real clients, as users reach it: each test runs a scenario of
/// `Tests/Clients/serve_clients.py`, which starts the built `strun serve` on a free loopback port
/// with the trained example in Q4_0, talks to it with the `openai` package, curl or raw HTTP, and
/// stops it with SIGTERM (it must exit 0). One scenario at a time: they share two cores with the
/// rest of the suite, and the load test and the shutdown test have time limits.
@Suite(.serialized) struct ServeCommandTests {
    static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Clients/serve_clients.py").path

    /// The trained example converted and quantised to Q4_0 once for every scenario.
    static let package: Result<String, any Error> = {
        let scratch = ToolScratch()
        let path = scratch.file("example-q4_0.stpk")
        do {
            let result = try Tools.run("stconvert", [TrainedModelCommandTests.directory, "-o", path, "--type", "q4_0", "-q"])
            guard result.status == 0 else { return .failure(ConversionFailed(message: result.stderr)) }
            keep = scratch
            return .success(path)
        } catch {
            return .failure(error)
        }
    }()
    nonisolated(unsafe) static var keep: ToolScratch?

    struct ConversionFailed: Error {
        let message: String
    }

    func run(_ scenario: String) throws {
        let package = try Self.package.get()
        let result = try Tools.run("/usr/bin/env", ["python3", Self.script, scenario, Tools.path("strun"), package])
        #expect(result.status == 0, "\(scenario): \(result.stdout)\(result.stderr)")
        print(result.stdout, terminator: "")
    }

    /// Models, chat (whole and streamed), completions, log-probabilities, stop strings,
    /// penalties and the prompt cache through the `openai` package; every seeded request gives the
    /// text `strun generate` gives with the same settings; n > 1 and an unknown model refused.
    @Test func openAIClient() throws { try run("openai") }

    /// Five turns of a chat: each reuses the previous turn's prompt from the cache; none with
    /// `--no-prompt-cache`.
    @Test func chatTurnsReuseThePromptCache() throws { try run("chat_turns") }

    /// The raw bytes of a stream, as curl receives them.
    @Test func serverSentEvents() throws { try run("sse") }

    /// A table of bad requests: each a 4xx in OpenAI's error shape, and the server goes on.
    @Test func badRequests() throws { try run("bad_requests") }

    @Test func apiKey() throws { try run("api_key") }

    /// 8 clients x 20 requests with a queue that fills: complete answers or 503 with Retry-After,
    /// counted alike by the clients and /metrics, within a time limit and an RSS bound.
    @Test func concurrentLoad() throws { try run("load") }

    /// A client killed mid-stream frees its sequence.
    @Test func clientDisconnect() throws { try run("disconnect") }

    /// SIGTERM during streams: finish or cut cleanly, exit 0.
    @Test func sigterm() throws { try run("sigterm") }

    /// The chat page in headless Chromium, driven by Selenium (`Tests/Clients/chat_page.py`): a
    /// streamed reply equal to the API's for the same seed, Stop freeing the sequence, a fresh chat
    /// on reload, phone and desktop sizes, errors and the API key. Screenshots of each step go to
    /// .build/screenshots/chat-page.
    @Test func chatPageInABrowser() throws {
        let package = try Self.package.get()
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let page = root.appendingPathComponent("Tests/Clients/chat_page.py").path
        let shots = root.appendingPathComponent(".build/screenshots/chat-page").path
        let result = try Tools.run("/usr/bin/env", ["python3", page, Tools.path("strun"), package, shots])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        print(result.stdout, terminator: "")
    }
}
