import Foundation
import Testing

/// Runs the built command-line tools as a user would.
enum Tools {
    /// The directory holding the built products: the test binary lives beside them.
    static let productsDirectory: URL = {
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        var dir = executable.deletingLastPathComponent()
        // Inside a bundle (…/X.xctest/…), step out of it.
        while dir.path.contains(".xctest") { dir = dir.deletingLastPathComponent() }
        return dir
    }()

    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/smallthinker-tiny").path

    struct Result {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    /// Whether the tools (built with the tests, with the same flags) run under the address
    /// sanitiser: `swift test --sanitize=address`.
    static let addressSanitized = dlsym(nil, "__asan_init") != nil

    /// A built tool's path; an absolute path is taken as it is.
    static func path(_ tool: String) -> String {
        tool.hasPrefix("/") ? tool : productsDirectory.appendingPathComponent(tool).path
    }

    /// Starts a tool with its output discarded, for a test that stops it.
    static func start(_ tool: String, _ arguments: [String]) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path(tool))
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return process
    }

    @discardableResult
    static func run(_ tool: String, _ arguments: [String], stdin: String? = nil, environment: [String: String] = [:]) throws -> Result {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path(tool))
        process.arguments = arguments
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        // Output goes to files, so a large output can never block the child on a full pipe.
        let base = NSTemporaryDirectory() + "tool-" + UUID().uuidString
        _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
        _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
        defer {
            try? FileManager.default.removeItem(atPath: base + ".out")
            try? FileManager.default.removeItem(atPath: base + ".err")
        }
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: base + ".out"))
        let err = try FileHandle(forWritingTo: URL(fileURLWithPath: base + ".err"))
        let input = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = input
        try process.run()
        if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
        try input.fileHandleForWriting.close()
        process.waitUntilExit()
        try out.close()
        try err.close()
        let outData = try Data(contentsOf: URL(fileURLWithPath: base + ".out"))
        let errData = try Data(contentsOf: URL(fileURLWithPath: base + ".err"))
        return Result(
            status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
            stderr: String(decoding: errData, as: UTF8.self))
    }
}

final class ToolScratch {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "stpk-tool-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
    var entries: [String] { ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted() }
}
