import Foundation
import Testing

/// Writers stopped the hard way: `kill -9` at random moments, and a file-size limit
/// (RLIMIT_FSIZE, as a full disk would) partway through the output. Neither may leave a partial
/// file under the output's name or touch what was there before.
@Suite(.serialized) struct HardStopTests {
    static let trained = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent("trained/trained-21b-like")
        .path

    /// One way to write a file, with the inputs it needs made in `scratch` first.
    struct Writer: CustomTestStringConvertible, Sendable {
        let name: String
        let tool: String
        /// Makes the inputs; returns the arguments that write `output`.
        let prepare: @Sendable (ToolScratch, String) throws -> [String]
        var testDescription: String { name }
        /// The output's file name (the GGUF export goes by its extension).
        var outputName: String { name.contains("GGUF") ? "out.gguf" : "out.bin" }
    }

    static func package(_ scratch: ToolScratch, type: String? = nil) throws -> String {
        let path = scratch.file("input-\(type ?? "bf16").stpk")
        if !FileManager.default.fileExists(atPath: path) {
            let result = try Tools.run("stconvert", [trained, "-o", path, "-q"] + (type.map { ["--type", $0] } ?? []))
            #expect(result.status == 0, "\(result.stderr)")
        }
        return path
    }

    static let writers: [Writer] = [
        Writer(name: "stconvert checkpoint to package", tool: "stconvert") { _, out in [trained, "-o", out, "-q", "--force"] },
        Writer(name: "stconvert --type q4_0 in one step", tool: "stconvert") { _, out in
            [trained, "-o", out, "-q", "--force", "--type", "q4_0"]
        },
        Writer(name: "stquant to q8_0", tool: "stquant") { scratch, out in
            [try package(scratch), "-o", out, "-q", "--force", "--type", "q8_0"]
        },
        Writer(name: "stconvert package to GGUF", tool: "stconvert") { scratch, out in
            [try package(scratch), "-o", out, "-q", "--force", "--force-layout"]
        },
        Writer(name: "strun logits", tool: "strun") { scratch, out in
            ["logits", try package(scratch, type: "q4_0"), "--tokens", Array(repeating: "7", count: 48).joined(separator: ","), "-o", out]
        }
    ]

    static let previous = Data("the previous output, which must survive\n".utf8)

    /// Files in the scratch directory that a writer of `output` may have made.
    static func temporaries(_ scratch: ToolScratch, of output: String) -> [String] {
        let base = "." + URL(fileURLWithPath: output).lastPathComponent + "."
        return scratch.entries.filter { $0.hasPrefix(base) && $0.hasSuffix(".tmp") }
    }

    /// Killed at random moments (half of them while its temporary file exists, so some land
    /// mid-write), a writer leaves the previous output or the whole new one, never a part; the
    /// next run succeeds, removes what the killed runs left and says so.
    @Test(arguments: writers)
    func killNineLeavesThePreviousOutputOrTheWholeNewOne(writer: Writer) throws {
        let scratch = ToolScratch()
        let output = scratch.file(writer.outputName)
        let arguments = try writer.prepare(scratch, output)
        let started = Date()
        let complete = try Tools.run(writer.tool, arguments)
        let duration = Date().timeIntervalSince(started)
        #expect(complete.status == 0, "\(complete.stderr)")
        let expected = try Data(contentsOf: URL(fileURLWithPath: output))
        #expect(expected != Self.previous && expected.count > 100_000)
        // How long the temporary lives, from when it is first seen to the writer's exit: the
        // kills meant to land mid-write wait a random part of that, not of the whole run (a first
        // run slowed by a busy machine made them land after the rename).
        let timing = try Tools.start(writer.tool, arguments)
        var seen: Date? = nil
        while timing.isRunning {
            if seen == nil, !Self.temporaries(scratch, of: output).isEmpty { seen = Date() }
            usleep(200)
        }
        timing.waitUntilExit()
        #expect(timing.terminationStatus == 0)
        let writing = seen.map { Date().timeIntervalSince($0) } ?? 0

        var midWrite = 0
        // Twelve rounds, and up to twelve more while none has landed mid-write.
        for round in 0..<24 where round < 12 || midWrite == 0 {
            try Self.previous.write(to: URL(fileURLWithPath: output))
            let process = try Tools.start(writer.tool, arguments)
            if round % 2 == 0 {
                usleep(UInt32.random(in: 0...UInt32(duration * 1.2e6)))
            } else {
                let deadline = Date().addingTimeInterval(10)
                while Self.temporaries(scratch, of: output).isEmpty && process.isRunning && Date() < deadline { usleep(200) }
                usleep(UInt32.random(in: 0...UInt32(writing * 0.8e6)))
            }
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            let now = try Data(contentsOf: URL(fileURLWithPath: output))
            #expect(now == Self.previous || now == expected, "round \(round): \(now.count) bytes under the output's name")
            let left = Self.temporaries(scratch, of: output)
            #expect(left.count <= 1, "\(left)")
            if !left.isEmpty { midWrite += 1 }
        }
        #expect(midWrite > 0, "no kill landed while the output was being written")

        let leftBefore = Self.temporaries(scratch, of: output)
        let again = try Tools.run(writer.tool, arguments)
        #expect(again.status == 0, "\(again.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: output)) == expected)
        #expect(Self.temporaries(scratch, of: output).isEmpty, "\(scratch.entries)")
        for name in leftBefore { #expect(again.stderr.contains("removed \(scratch.file(name))"), "\(again.stderr)") }
    }

    /// With a file-size limit partway through the output (what a full disk does to the next
    /// write), the writer stops with a one-line error, leaves no temporary and does not touch the
    /// previous output.
    @Test(arguments: writers)
    func aFileSizeLimitIsAClearErrorAndNoPartialOutput(writer: Writer) throws {
        let scratch = ToolScratch()
        let output = scratch.file(writer.outputName)
        let arguments = try writer.prepare(scratch, output)
        #expect(try Tools.run(writer.tool, arguments).status == 0)
        let size = try Data(contentsOf: URL(fileURLWithPath: output)).count
        try Self.previous.write(to: URL(fileURLWithPath: output))
        // prlimit sets the limit; SIGXFSZ stays ignored across exec, so writes fail with EFBIG.
        let limited = try Tools.run(
            "/bin/sh", ["-c", "trap '' XFSZ; exec prlimit --fsize=\(size / 2) \"$@\"", "sh", Tools.path(writer.tool)] + arguments)
        #expect(limited.status == 1, "\(limited.stderr)")
        #expect(
            limited.stderr.hasPrefix("\(writer.tool): error: \(output) (being written as .")
                && limited.stderr.contains("File too large"), "\(limited.stderr)")
        #expect(limited.stderr.split(separator: "\n").count == 1, "\(limited.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: output)) == Self.previous)
        #expect(Self.temporaries(scratch, of: output).isEmpty, "\(scratch.entries)")
    }
}
