import Foundation
import Format

public enum TokenizerError: ReportableError, Equatable {
    /// The file is not a tokenizer we can run exactly; `detail` says what is different.
    case unsupported(path: String, detail: String)
    /// The file is damaged or not a tokenizer.json.
    case malformed(path: String, detail: String)
    /// The tokenizer and the model disagree.
    case mismatch(String)
    /// The package holds no tokenizer.json.
    case missing

    public var description: String {
        switch self {
        case .unsupported(let path, let detail): return "\(path): unsupported tokenizer: \(detail)"
        case .malformed(let path, let detail): return "\(path): not a valid tokenizer.json: \(detail)"
        case .mismatch(let detail): return detail
        case .missing:
            return
                "the package has no tokenizer; give --tokenizer tokenizer.json, convert with stconvert --tokenizer DIR, or run on token "
                + "ids with --tokens and --ids"
        }
    }
}

/// The Qwen2 byte-level BPE tokenizer, loaded from a Hugging Face `tokenizer.json`, encoding and
/// decoding exactly as the `tokenizers` library does: added tokens are found in the raw text
/// first (longest match, leftmost first); the text between them is NFC-normalised, split by the
/// Qwen2 pattern, mapped to byte-level characters and merged by BPE rank.
public final class Tokenizer: @unchecked Sendable {
    public let vocabularySize: Int
    /// Added tokens (special and not), by content.
    public let addedTokens: [String: Int]
    /// Ids of added tokens marked special (decode can skip them).
    public let specialIDs: Set<Int>
    let model: BPEModel
    let idToToken: [String?]
    let addedByFirstScalar: [Unicode.Scalar: [(content: [Unicode.Scalar], id: Int)]]
    let normalizeNFC: Bool
    private var cache: [String: [Int32]] = [:]
    private let cacheLock = NSLock()

    public convenience init(path: String) throws {
        let bytes = try FileSystem.readAll(path, limit: 256 << 20)
        try self.init(json: bytes, path: path)
    }

    /// The tokenizer a package embeds, checked against the model's vocabulary.
    public convenience init(package: PackageReader) throws(TokenizerError) {
        guard let bytes = package.fileContents("tokenizer.json") else { throw .missing }
        try self.init(json: bytes, path: "tokenizer.json in the package")
        if vocabularySize > package.manifest.config.vocabSize {
            throw .mismatch(
                "the tokenizer has ids up to \(vocabularySize - 1), past the model's vocabulary of \(package.manifest.config.vocabSize)")
        }
    }

    public init(json bytes: [UInt8], path: String) throws(TokenizerError) {
        func malformed(_ detail: String) -> TokenizerError { .malformed(path: path, detail: detail) }
        func unsupported(_ detail: String) -> TokenizerError { .unsupported(path: path, detail: detail) }
        let root: JSONObject
        do {
            guard let object = try JSONParser.parse(bytes).objectValue else { throw malformed("the file is not a JSON object") }
            root = object
        } catch let error as JSONParser.Failure {
            throw malformed(error.description)
        } catch {
            throw error as! TokenizerError
        }
        // Normaliser: NFC or none.
        switch root["normalizer"] {
        case nil, .null?: normalizeNFC = false
        case let value?:
            guard value.objectValue?["type"]?.stringValue == "NFC" else {
                throw unsupported("normalizer \(JSONWriter.serialize(value).prefix(120)); expected NFC")
            }
            normalizeNFC = true
        }
        // Pre-tokeniser: the Qwen2 split pattern, then byte-level without its own regex.
        let expectedPattern =
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
            + "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        let steps = root["pre_tokenizer"]?.objectValue?["pretokenizers"]?.arrayValue ?? []
        let split = steps.first?.objectValue
        guard root["pre_tokenizer"]?.objectValue?["type"]?.stringValue == "Sequence", steps.count == 2,
            split?["type"]?.stringValue == "Split",
            split?["pattern"]?.objectValue?["Regex"]?.stringValue == expectedPattern,
            split?["behavior"]?.stringValue == "Isolated", split?["invert"]?.boolValue == false,
            steps[1].objectValue?["type"]?.stringValue == "ByteLevel", steps[1].objectValue?["use_regex"]?.boolValue == false,
            steps[1].objectValue?["add_prefix_space"]?.boolValue != true
        else {
            throw unsupported("the pre-tokenizer is not Qwen2's (Split on its pattern, then ByteLevel without regex)")
        }
        guard root["decoder"]?.objectValue?["type"]?.stringValue == "ByteLevel" else {
            throw unsupported("the decoder is not ByteLevel")
        }
        guard let modelObject = root["model"]?.objectValue, modelObject["type"]?.stringValue == "BPE" else {
            throw unsupported("the model is not BPE")
        }
        if modelObject["byte_fallback"]?.boolValue == true || modelObject["ignore_merges"]?.boolValue == true
            || !(modelObject["continuing_subword_prefix"]?.stringValue ?? "").isEmpty
            || !(modelObject["end_of_word_suffix"]?.stringValue ?? "").isEmpty
            || !(modelObject["dropout"]?.isNull ?? true)
        {
            throw unsupported("BPE options byte_fallback / ignore_merges / subword prefix or suffix / dropout are not used by Qwen2")
        }
        guard let vocabObject = modelObject["vocab"]?.objectValue, let mergeList = modelObject["merges"]?.arrayValue else {
            throw malformed("model.vocab or model.merges is missing")
        }
        var vocabulary: [String: Int] = [:]
        vocabulary.reserveCapacity(vocabObject.count)
        var maxID = -1
        for (token, value) in vocabObject.entries {
            guard let id = value.intValue, id >= 0, id < 1 << 24 else {
                throw malformed("vocab entry \(token) has id \(JSONWriter.serialize(value))")
            }
            vocabulary[token] = id
            maxID = max(maxID, id)
        }
        var added: [String: Int] = [:]
        var special = Set<Int>()
        for entry in root["added_tokens"]?.arrayValue ?? [] {
            guard let object = entry.objectValue, let id = object["id"]?.intValue, id >= 0, id < 1 << 24,
                let content = object["content"]?.stringValue, !content.isEmpty
            else {
                throw malformed("an added_tokens entry lacks id or content")
            }
            if object["lstrip"]?.boolValue == true || object["rstrip"]?.boolValue == true || object["single_word"]?.boolValue == true {
                throw unsupported("added token \(content) uses lstrip/rstrip/single_word")
            }
            added[content] = id
            if object["special"]?.boolValue == true { special.insert(id) }
            maxID = max(maxID, id)
        }
        vocabularySize = maxID + 1
        var idToToken = [String?](repeating: nil, count: maxID + 1)
        for (token, id) in vocabulary { idToToken[id] = token }
        for (content, id) in added { idToToken[id] = content }

        var byteTokens = [Int32](repeating: -1, count: 256)
        for byte in 0..<256 {
            guard let id = vocabulary[String(ByteLevel.byteToScalar[byte])] else {
                throw malformed("the vocabulary lacks the byte-level character for byte \(byte)")
            }
            byteTokens[byte] = Int32(id)
        }
        var merges: [UInt64: (rank: Int32, merged: Int32)] = [:]
        merges.reserveCapacity(mergeList.count)
        for (rank, merge) in mergeList.enumerated() {
            let pair: [String]
            if let text = merge.stringValue {
                pair = text.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            } else {
                pair = merge.arrayValue?.compactMap { $0.stringValue } ?? []
            }
            guard pair.count == 2, let a = vocabulary[pair[0]], let b = vocabulary[pair[1]], let m = vocabulary[pair[0] + pair[1]] else {
                throw malformed("merge \(rank) (\(JSONWriter.serialize(merge))) names tokens that are not in the vocabulary")
            }
            let key = BPEModel.key(Int32(a), Int32(b))
            if merges[key] == nil { merges[key] = (Int32(rank), Int32(m)) }
        }
        model = BPEModel(vocabulary: vocabulary, merges: merges, byteTokens: byteTokens)
        self.idToToken = idToToken
        addedTokens = added
        specialIDs = special
        var byFirst: [Unicode.Scalar: [(content: [Unicode.Scalar], id: Int)]] = [:]
        for (content, id) in added {
            let scalars = Array(content.unicodeScalars)
            byFirst[scalars[0], default: []].append((scalars, id))
        }
        // Longest first, so the first hit at a position is the longest match.
        addedByFirstScalar = byFirst.mapValues { $0.sorted { $0.content.count > $1.content.count } }
    }

    public func id(of token: String) -> Int? { addedTokens[token] ?? model.vocabulary[token] }

    // MARK: Encoding

    /// Token ids for `text`. Text that spells an added token encodes to that token.
    public func encode(_ text: String) -> [Int] {
        var ids: [Int] = []
        let scalars = Array(text.unicodeScalars)
        var segmentStart = 0
        var i = 0
        while i < scalars.count {
            if let candidates = addedByFirstScalar[scalars[i]],
                let hit = candidates.first(where: {
                    i + $0.content.count <= scalars.count && Array(scalars[i..<i + $0.content.count]) == $0.content
                })
            {
                encodeOrdinary(scalars[segmentStart..<i], into: &ids)
                ids.append(hit.id)
                i += hit.content.count
                segmentStart = i
            } else {
                i += 1
            }
        }
        encodeOrdinary(scalars[segmentStart..<scalars.count], into: &ids)
        return ids
    }

    private func encodeOrdinary(_ segment: ArraySlice<Unicode.Scalar>, into ids: inout [Int]) {
        guard !segment.isEmpty else { return }
        var text = String(String.UnicodeScalarView(segment))
        if normalizeNFC { text = text.precomposedStringWithCanonicalMapping }
        let scalars = Array(text.unicodeScalars)
        for piece in QwenPreTokenizer.split(scalars) {
            let word = String(String.UnicodeScalarView(scalars[piece]))
            cacheLock.lock()
            let cached = cache[word]
            cacheLock.unlock()
            if let cached {
                ids += cached.lazy.map(Int.init)
                continue
            }
            let encoded = model.encode(Array(word.utf8))
            cacheLock.lock()
            if cache.count > 100_000 { cache.removeAll(keepingCapacity: true) }
            cache[word] = encoded
            cacheLock.unlock()
            ids += encoded.lazy.map(Int.init)
        }
    }

    // MARK: Decoding

    /// The bytes token `id` stands for (added tokens: their UTF-8 text), or nil for an unknown id.
    public func bytes(of id: Int) -> [UInt8]? {
        guard id >= 0, id < idToToken.count, let token = idToToken[id] else { return nil }
        if addedTokens[token] == id { return Array(token.utf8) }
        return ByteLevel.decode(token)
    }

    /// The text of `ids`; invalid UTF-8 becomes U+FFFD, as `tokenizers` does.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) throws(TokenizerError) -> String {
        var bytes: [UInt8] = []
        for id in ids {
            if skipSpecialTokens && specialIDs.contains(id) { continue }
            guard let b = self.bytes(of: id) else { throw .mismatch("token id \(id) is not in the tokenizer (0..<\(vocabularySize))") }
            bytes += b
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// Turns a stream of token ids into text as it is produced, holding back the bytes of a UTF-8
/// sequence until it is complete (a token may end in the middle of a character).
public struct StreamingDecoder: Sendable {
    let tokenizer: Tokenizer
    let skipSpecialTokens: Bool
    private var pending: [UInt8] = []

    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = false) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// The text that is complete after adding `id` (possibly empty).
    public mutating func add(_ id: Int) throws(TokenizerError) -> String {
        if skipSpecialTokens && tokenizer.specialIDs.contains(id) { return "" }
        guard let bytes = tokenizer.bytes(of: id) else { throw .mismatch("token id \(id) is not in the tokenizer") }
        pending += bytes
        let complete = StreamingDecoder.completePrefixLength(pending)
        let text = String(decoding: pending[..<complete], as: UTF8.self)
        pending.removeFirst(complete)
        return text
    }

    /// Whatever is still held back (an incomplete sequence at the very end becomes U+FFFD).
    public mutating func flush() -> String {
        defer { pending.removeAll() }
        return String(decoding: pending, as: UTF8.self)
    }

    /// Length of the longest prefix that does not end inside a UTF-8 sequence that could still be
    /// completed. Invalid bytes are not held back (they decode to U+FFFD right away).
    static func completePrefixLength(_ bytes: [UInt8]) -> Int {
        let n = bytes.count
        // Look back at most 3 bytes for the start of the last sequence.
        var k = n - 1
        while k >= 0 && k >= n - 4 {
            let b = bytes[k]
            if b & 0xC0 != 0x80 {  // a lead byte (or ASCII)
                let length =
                    switch b {
                    case 0xC2...0xDF: 2
                    case 0xE0...0xEF: 3
                    case 0xF0...0xF4: 4
                    default: 1  // ASCII, or a byte that can never start a sequence
                    }
                return n - k < length ? k : n
            }
            k -= 1
        }
        return n
    }
}
