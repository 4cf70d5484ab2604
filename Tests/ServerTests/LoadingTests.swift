import Dispatch
import Foundation
import Server
import Synchronization
import Testing

#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// The server listens before the model is loaded: until then /health and the API answer 503,
/// and a model that fails to load stops the server with that error.
@Suite struct LoadingTests {
    struct LoadFailed: Error {}

    func get(_ port: Int, _ path: String) async throws -> (Int, String) {
        let (data, response) = try await URLSession.shared.data(from: URL(string: "http://127.0.0.1:\(port)\(path)")!)
        return ((response as! HTTPURLResponse).statusCode, String(decoding: data, as: UTF8.self))
    }

    @Test func unavailableUntilLoadedAndALoadFailureStopsTheServer() async throws {
        let gate = DispatchSemaphore(value: 0)
        var configuration = ServerConfiguration()
        configuration.port = 0
        let server = ModelServer(configuration: configuration) {
            gate.wait()
            throw LoadFailed()
        }
        let bound = Mutex<Int?>(nil)
        let running = Task { try await server.run { _, port in bound.withLock { $0 = port } } }
        var port: Int?
        for _ in 0..<600 where port == nil {
            try await Task.sleep(for: .milliseconds(50))
            port = bound.withLock { $0 }
        }
        guard let port else {
            gate.signal()
            Issue.record("the server did not listen within 30 s")
            return
        }
        let (status, body) = try await get(port, "/health")
        #expect(status == 503 && body.contains(#""code":"loading""#), "\(body)")
        #expect(try await get(port, "/v1/models").0 == 503)
        let (metricsStatus, metrics) = try await get(port, "/metrics")
        #expect(metricsStatus == 200 && metrics.contains("strun_model_loaded 0"))
        gate.signal()
        await #expect(throws: LoadFailed.self) { try await running.value }
    }
}
