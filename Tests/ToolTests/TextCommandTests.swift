import Foundation
import Testing

/// Text in, text out through the built strun, driven through pipes.
@Suite struct TextCommandTests {
    static let tinyTokenizer = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent("tiny-tokenizer")
        .path
    static let qwenTokenizer = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent(
        "qwen-tokenizer/tokenizer.json"
    ).path

    func package(_ scratch: ToolScratch) throws -> String {
        let path = scratch.file("chat.stpk")
        let result = try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "--tokenizer", Self.tinyTokenizer, "-o", path, "-q"])
        #expect(result.status == 0, "\(result.stderr)")
        return path
    }

    @Test func generateStreamsTextAndMatchesTheIdPath() throws {
        let scratch = ToolScratch()
        let path = try package(scratch)
        let text = try Tools.run("strun", ["generate", path, "-p", "Hello, how are", "-n", "10", "--temperature", "0", "--ignore-eos"])
        #expect(text.status == 0, "\(text.stderr)")
        let ids = try Tools.run(
            "strun", ["generate", path, "-p", "Hello, how are", "-n", "10", "--temperature", "0", "--ignore-eos", "--ids"])
        #expect(ids.status == 0)
        let idList = ids.stdout.trimmingCharacters(in: .whitespacesAndNewlines).replacingOccurrences(of: " ", with: ",")
        let decoded = try Tools.run("strun", ["detokenize", path, "--ids", idList, "--skip-special-tokens"])
        #expect(text.stdout == decoded.stdout, "streamed text equals the decoded ids")
        let prompt = try Tools.run("strun", ["tokenize", path, "--text", "Hello, how are"])
        #expect(prompt.stdout.hasPrefix("[") && prompt.stdout.hasSuffix("]\n"))
    }

    @Test func chatThroughAPipeAnswersEachLineAndResets() throws {
        let scratch = ToolScratch()
        let path = try package(scratch)
        let input = "Hello there\nWhat is the capital of France?\n/reset\nHello there\n/quit\nnever read\n"
        let result = try Tools.run("strun", ["chat", path, "-n", "6", "--temperature", "0"], stdin: input)
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let reset = try #require(lines.firstIndex(of: "(conversation reset)"))
        #expect(reset == 2, "two replies, one line each, before the reset: \(lines)")
        #expect(lines[3] == lines[0], "after /reset the same message gets the same greedy reply")
        #expect(lines.count == 5 && lines[4].isEmpty, "nothing after /quit")
    }

    @Test func chatReportsAFullContext() throws {
        let scratch = ToolScratch()
        let path = try package(scratch)
        let result = try Tools.run(
            "strun", ["chat", path, "-n", "4", "--temperature", "0", "--context", "40"],
            stdin: "Hello there\nAnd again, a longer message\nand more\n")
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("the context is full: 40 tokens; /reset to start over"))
    }

    @Test func tokenizeAndDetokenizeWithTheQwenTokenizer() throws {
        let scratch = ToolScratch()
        let file = scratch.file("text.txt")
        try "Hello, world! 你好 <|im_end|>".write(toFile: file, atomically: true, encoding: .utf8)
        let ids = try Tools.run("strun", ["tokenize", "--tokenizer", Self.qwenTokenizer, "--file", file])
        #expect(ids.status == 0, "\(ids.stderr)")
        #expect(ids.stdout.hasPrefix("[9707,11,1879,0,220") && ids.stdout.hasSuffix(",151645]\n"))
        let list = String(ids.stdout.dropFirst().dropLast(2))
        let text = try Tools.run("strun", ["detokenize", "--tokenizer", Self.qwenTokenizer, "--ids", list])
        #expect(text.stdout == "Hello, world! 你好 <|im_end|>\n")
        let skipped = try Tools.run("strun", ["detokenize", "--tokenizer", Self.qwenTokenizer, "--ids", list, "--skip-special-tokens"])
        #expect(skipped.stdout == "Hello, world! 你好 \n")
    }

    @Test func tokenizerProblemsAreClearErrors() throws {
        let scratch = ToolScratch()
        let mismatch = try Tools.run(
            "stconvert",
            [
                Tools.fixtures + "/tiny-4b-like", "--tokenizer", URL(fileURLWithPath: Self.qwenTokenizer).deletingLastPathComponent().path,
                "-o", scratch.file("x.stpk")
            ])
        #expect(mismatch.status == 1 && mismatch.stderr.contains("tokenizer does not fit the model"))
        let plain = scratch.file("plain.stpk")
        #expect(try Tools.run("stconvert", [Tools.fixtures + "/tiny-4b-like", "-o", plain, "-q"]).status == 0)
        let noTokenizer = try Tools.run("strun", ["generate", plain, "-p", "hi"])
        #expect(noTokenizer.status != 0 && noTokenizer.stderr.contains("has no tokenizer"))
        try "{\"model\": 1}".write(toFile: scratch.file("bad.json"), atomically: true, encoding: .utf8)
        let bad = try Tools.run("strun", ["tokenize", "--tokenizer", scratch.file("bad.json"), "--text", "x"])
        #expect(bad.status == 1 && bad.stderr.contains("unsupported tokenizer"))
        let unknown = try Tools.run("strun", ["detokenize", "--tokenizer", Self.qwenTokenizer, "--ids", "999999"])
        #expect(unknown.status == 1 && unknown.stderr.contains("999999"))
    }
}
