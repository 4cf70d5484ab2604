// libFuzzer target: tokenizer.json. An input starting with "{" is a tokenizer.json to load and
// use; any other input is text for the Qwen tokenizer (the real one, loaded once) to encode.
// Every id it gives must be in the vocabulary and decode back; byte-level BPE loses nothing, so
// the decoded text must be the input (as valid UTF-8) after the tokenizer's NFC normalisation.
import Engine
import Format

@_cdecl("LLVMFuzzerInitialize")
public func initialize(
    _ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>
) -> Int32 {
    _ = qwen.vocabularySize
    return 0
}

/// Encodes and decodes; returns the decoded text.
@discardableResult
func exercise(_ tokenizer: Tokenizer, _ text: String) -> String? {
    let ids = tokenizer.encode(text)
    for id in ids where tokenizer.bytes(of: id) == nil { fatalError("encode gave id \(id), which has no bytes") }
    return try? tokenizer.decode(ids)
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTokenizer(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if bytes.first == UInt8(ascii: "{") {
        guard let tokenizer = try? Tokenizer(json: bytes, path: "input.json") else { return 0 }
        exercise(tokenizer, "Hello, world! 123 héllo\n\tthe end")
        return 0
    }
    let text = String(decoding: bytes, as: UTF8.self)
    // Swift's == is canonical equivalence, which is what NFC normalisation preserves.
    guard let back = exercise(qwen, text), back == text else {
        fatalError("decode(encode(text)) is not the text: \(Array(text.utf8)) -> \(Array((exercise(qwen, text) ?? "<error>").utf8))")
    }
    return 0
}
