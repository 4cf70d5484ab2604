import Foundation
import Testing

/// stconvert to and from GGUF through the built binary.
@Suite struct GGUFCommandTests {
    static let trained = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent("trained/trained-21b-like")
        .path

    /// A package exported to GGUF and imported again generates what the package generates; the
    /// export refuses a layout llama.cpp cannot run (no output) unless --force-layout, and the
    /// import says what it inferred; a damaged GGUF is one line of error and no output.
    @Test func exportAndImportRunTheSameModel() throws {
        let scratch = ToolScratch()
        let package = scratch.file("t.stpk"), gguf = scratch.file("t.gguf"), back = scratch.file("back.stpk")
        #expect(try Tools.run("stconvert", [Self.trained, "-o", package, "-q"]).status == 0)
        let refused = try Tools.run("stconvert", [package, "-o", gguf])
        #expect(
            refused.status == 1 && refused.stderr.contains("window of 4096") && refused.stderr.contains("--force-layout"),
            "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: gguf))
        let exported = try Tools.run("stconvert", [package, "-o", gguf, "--force-layout"])
        #expect(exported.status == 0 && exported.stdout.contains("GGUF for llama.cpp"), "\(exported.stderr)")
        let imported = try Tools.run("stconvert", [gguf, "-o", back])
        #expect(imported.status == 0, "\(imported.stderr)")
        #expect(imported.stderr.contains("inferred by llama.cpp's rule"), "\(imported.stderr)")
        let args = ["-p", "And it came to pass", "-n", "12", "--temperature", "0"]
        let a = try Tools.run("strun", ["generate", package] + args), b = try Tools.run("strun", ["generate", back] + args)
        #expect(a.status == 0 && a.stdout == b.stdout && !a.stdout.isEmpty, "\(a.stdout) / \(b.stdout)")
        #expect(try Tools.run("strun", ["verify", back, "-q"]).status == 0)

        var bytes = try Data(contentsOf: URL(fileURLWithPath: gguf))
        bytes = bytes.prefix(bytes.count / 2)
        let cut = scratch.file("cut.gguf"), out = scratch.file("cut.stpk")
        try bytes.write(to: URL(fileURLWithPath: cut))
        let damaged = try Tools.run("stconvert", [cut, "-o", out])
        #expect(
            damaged.status == 1 && damaged.stderr.hasPrefix("stconvert: error: ") && damaged.stderr.contains("past the end"),
            "\(damaged.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }
}
