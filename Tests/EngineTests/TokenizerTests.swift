import Foundation
import Testing
@testable import Engine

enum TokenizerFixture {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent(
        "Fixtures"
    ).path
    static let qwenPath = root + "/qwen-tokenizer/tokenizer.json"
    /// Loaded once per test process (11 MB of JSON).
    static let qwen: Tokenizer = try! Tokenizer(path: qwenPath)

    struct Case: Decodable, CustomTestStringConvertible, Sendable {
        let text: String
        let ids: [Int]
        let decoded: String
        var testDescription: String { String(text.debugDescription.prefix(60)) }
    }

    static let golden: [Case] = {
        struct File: Decodable { let cases: [Case] }
        return try! JSONDecoder().decode(File.self, from: Data(contentsOf: URL(fileURLWithPath: root + "/tokenizer/golden.json"))).cases
    }()
}

/// The Qwen tokenizer against golden encodings from the `tokenizers` library.
@Suite struct TokenizerTests {
    @Test(arguments: TokenizerFixture.golden)
    func encodingMatchesTokenizersIdForId(_ c: TokenizerFixture.Case) throws {
        let ids = TokenizerFixture.qwen.encode(c.text)
        #expect(ids == c.ids)
    }

    @Test(arguments: TokenizerFixture.golden)
    func decodingRoundTripsToTheNormalisedText(_ c: TokenizerFixture.Case) throws {
        let tokenizer = TokenizerFixture.qwen
        let decoded = try tokenizer.decode(c.ids)
        #expect(decoded == c.decoded)
        // decode(encode(x)) is x up to NFC normalisation, which encoding applies.
        #expect(Array(decoded.unicodeScalars) == Array(c.text.precomposedStringWithCanonicalMapping.unicodeScalars))
        // Streaming gives the same text, however the bytes fall across tokens.
        var stream = StreamingDecoder(tokenizer: tokenizer)
        var text = ""
        for id in c.ids {
            let piece = try stream.add(id)
            #expect(
                !piece.unicodeScalars.contains("\u{FFFD}") || c.text.unicodeScalars.contains("\u{FFFD}"), "no broken characters mid-stream")
            text += piece
        }
        text += stream.flush()
        #expect(text == decoded)
    }

    @Test func specialTokensAreRecognisedAndCanBeSkipped() throws {
        let t = TokenizerFixture.qwen
        #expect(t.id(of: "<|im_start|>") == 151644)
        #expect(t.id(of: "<|im_end|>") == 151645)
        #expect(t.id(of: "<|endoftext|>") == 151643)
        let ids = t.encode("<|im_start|>user\nhi<|im_end|>")
        #expect(ids.first == 151644 && ids.last == 151645)
        #expect(try t.decode(ids, skipSpecialTokens: true) == "user\nhi")
        #expect(throws: TokenizerError.self) { try t.decode([999_999]) }
    }

    @Test func streamingHoldsBackIncompleteCharacters() {
        #expect(StreamingDecoder.completePrefixLength([0x61, 0xE4, 0xBD]) == 1, "two bytes of a three-byte character wait")
        #expect(StreamingDecoder.completePrefixLength([0x61, 0xE4, 0xBD, 0xA0]) == 4)
        #expect(StreamingDecoder.completePrefixLength([0xF0, 0x9F, 0x98]) == 0)
        #expect(StreamingDecoder.completePrefixLength([0x61, 0xFF]) == 2, "an invalid byte is not held back")
        #expect(StreamingDecoder.completePrefixLength([0x80, 0x80, 0x80, 0x80, 0x80]) == 5)
    }

    @Test func malformedOrForeignTokenizerFilesGetClearErrors() throws {
        func load(_ text: String) throws { _ = try Tokenizer(json: Array(text.utf8), path: "t.json") }
        #expect(throws: TokenizerError.self) { try load("{") }
        #expect { try load("[]") } throws: { ($0 as? TokenizerError).map { "\($0)".contains("not a valid tokenizer.json") } ?? false }
        #expect { try load(#"{"normalizer": {"type": "NFKC"}}"#) } throws: { "\($0)".contains("unsupported tokenizer: normalizer") }
        #expect { try load(#"{"normalizer": null, "pre_tokenizer": {"type": "Whitespace"}}"#) } throws: {
            "\($0)".contains("pre-tokenizer is not Qwen2's")
        }
        // A real file with its model switched to WordPiece.
        var json = try String(contentsOfFile: TokenizerFixture.qwenPath, encoding: .utf8)
        json = json.replacingOccurrences(of: "\"type\": \"BPE\"", with: "\"type\": \"WordPiece\"")
        #expect { try load(json) } throws: { "\($0)".contains("the model is not BPE") }
    }
}
