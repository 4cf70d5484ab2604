import Testing
@testable import Format

@Suite struct JSONTests {
    @Test func duplicateKeysAreRejectedWithTheirOffset() {
        #expect(throws: JSONParser.Failure(offset: 8, reason: "duplicate key \"a\"")) { try JSONParser.parse("{\"a\":1, \"a\":2}") }
    }

    @Test(arguments: ["", "{", "[1,]", "{\"a\" 1}", "01", "1.", "-", "\"\\ud800\"", "\"\u{01}\"", "tru", "{} x", "[1 2]"])
    func malformedDocumentsAreRejected(text: String) {
        #expect(throws: JSONParser.Failure.self) { try JSONParser.parse(text) }
    }

    @Test func integersAreExactBeyondDoublePrecision() throws {
        let value = try JSONParser.parse("[9007199254740993, -5, 1e-06, 4.0]")
        let items = try #require(value.arrayValue)
        #expect(items[0].intValue == 9_007_199_254_740_993)
        #expect(items[1].intValue == -5)
        #expect(items[2].doubleValue == 1e-6)
        #expect(items[3].intValue == 4)
    }

    @Test func deepNestingIsRefused() {
        let deep = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        #expect(throws: JSONParser.Failure.self) { try JSONParser.parse(deep) }
    }

    @Test func writerRoundTripsStringsAndKeepsKeyOrder() throws {
        let value = JSONValue.object(
            JSONObject([("z", .string("tab\t \"quote\" \u{1F600} \u{07}")), ("a", .double(1e-6)), ("m", .double(1500000))]))
        let text = JSONWriter.serialize(value)
        #expect(text.hasPrefix("{\"z\":"))
        #expect(try JSONParser.parse(text) == value)
        #expect(JSONWriter.serialize(.double(1500000)) == "1500000.0")
        #expect(JSONWriter.serialize(value, pretty: true).contains("\n  \"a\": 1e-06"))
    }

    @Test func surrogatePairsDecode() throws {
        #expect(try JSONParser.parse("\"\\ud83d\\ude00\"") == .string("\u{1F600}"))
    }
}
