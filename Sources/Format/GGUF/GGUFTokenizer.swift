/// The tokenizer both ways between a Hugging Face `tokenizer.json` (+ `tokenizer_config.json`)
/// and GGUF's `tokenizer.ggml.*` keys, for the byte-level BPE of SmallThinker (Qwen2's: llama.cpp
/// calls its pre-tokeniser `qwen2`).
enum GGUFTokenizer {
    /// Qwen2's pre-tokeniser split, as its tokenizer.json writes it.
    static let qwen2Pattern =
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
    /// ggml's token types.
    static let normal: Int32 = 1, control: Int32 = 3, userDefined: Int32 = 4

    /// GGUF keys from a package's tokenizer files; `vocabulary` ids in all (ids the tokenizer
    /// lacks, padding rows of the embedding, become `[PAD<id>]`, as llama.cpp's converter does).
    static func keys(tokenizerJSON: [UInt8], config: [UInt8]?, vocabulary: Int, path: String) throws(FormatError) -> [(String, GGUFValue)] {
        func bad(_ detail: String) -> FormatError { .invalidRequest("\(path): \(detail)") }
        guard let root = try? JSONParser.parse(tokenizerJSON).objectValue, let model = root["model"]?.objectValue,
            model["type"]?.stringValue == "BPE", let vocab = model["vocab"]?.objectValue
        else { throw bad("tokenizer.json is not a BPE tokenizer with a vocab") }
        var tokens = (0..<vocabulary).map { "[PAD\($0)]" }
        var types = [Int32](repeating: userDefined, count: vocabulary)
        for (token, id) in vocab.entries {
            guard let id = id.intValue, (0..<vocabulary).contains(id) else {
                throw bad("vocab id of \(token) is outside 0..<\(vocabulary)")
            }
            tokens[id] = token
            types[id] = normal
        }
        for added in root["added_tokens"]?.arrayValue ?? [] {
            guard let o = added.objectValue, let id = o["id"]?.intValue, let content = o["content"]?.stringValue,
                (0..<vocabulary).contains(id)
            else { throw bad("an added token is malformed or outside the vocabulary") }
            tokens[id] = content
            types[id] = o["special"]?.boolValue == true ? control : userDefined
        }
        var merges: [GGUFValue] = []
        for merge in model["merges"]?.arrayValue ?? [] {
            if let s = merge.stringValue {
                merges.append(.string(s))
            } else if let pair = merge.arrayValue, pair.count == 2, let a = pair[0].stringValue, let b = pair[1].stringValue {
                merges.append(.string(a + " " + b))
            } else {
                throw bad("a merge is neither \"a b\" nor [a, b]")
            }
        }
        var out: [(String, GGUFValue)] = [
            ("tokenizer.ggml.model", .string("gpt2")),
            ("tokenizer.ggml.pre", .string("qwen2")),
            ("tokenizer.ggml.tokens", .array(8, tokens.map { .string($0) })),
            ("tokenizer.ggml.token_type", .array(5, types.map { .int32($0) })),
            ("tokenizer.ggml.merges", .array(8, merges))
        ]
        let settings = config.flatMap { try? JSONParser.parse($0).objectValue }
        func id(of key: String) -> Int? {
            guard let content = settings?[key]?.stringValue ?? settings?[key]?.objectValue?["content"]?.stringValue else { return nil }
            return tokens.firstIndex(of: content)
        }
        if let bos = id(of: "bos_token") { out.append(("tokenizer.ggml.bos_token_id", .uint32(UInt32(bos)))) }
        if let eos = id(of: "eos_token") { out.append(("tokenizer.ggml.eos_token_id", .uint32(UInt32(eos)))) }
        if let pad = id(of: "pad_token") { out.append(("tokenizer.ggml.padding_token_id", .uint32(UInt32(pad)))) }
        out.append(("tokenizer.ggml.add_bos_token", .bool(settings?["add_bos_token"]?.boolValue ?? false)))
        if let template = settings?["chat_template"]?.stringValue { out.append(("tokenizer.chat_template", .string(template))) }
        return out
    }

    /// tokenizer.json and tokenizer_config.json rebuilt from a GGUF's keys.
    static func files(_ gguf: GGUFFile) throws(FormatError) -> (tokenizer: [UInt8], config: [UInt8]) {
        func bad(_ defect: GGUFDefect, _ detail: String) -> FormatError { .malformedGGUF(path: gguf.path, defect: defect, detail: detail) }
        let m = gguf.metadata
        guard m["tokenizer.ggml.model"]?.string == "gpt2" else {
            throw bad(
                .invalidValue,
                "tokenizer.ggml.model is \(m["tokenizer.ggml.model"]?.string ?? "missing"); SmallThinker's is gpt2 (byte-level BPE)")
        }
        let pre = m["tokenizer.ggml.pre"]?.string ?? "missing"
        guard pre == "qwen2" else {
            throw bad(.invalidValue, "tokenizer.ggml.pre is \(pre); this import rebuilds the qwen2 pre-tokeniser only")
        }
        guard let tokens = m["tokenizer.ggml.tokens"]?.array?.map(\.string), !tokens.contains(nil) else {
            throw bad(.missingKey, "tokenizer.ggml.tokens is missing or not a list of strings")
        }
        let types = m["tokenizer.ggml.token_type"]?.array?.map(\.int) ?? []
        guard types.count == tokens.count, !types.contains(nil) else {
            throw bad(.invalidValue, "tokenizer.ggml.token_type has \(types.count) entries for \(tokens.count) tokens")
        }
        guard let merges = m["tokenizer.ggml.merges"]?.array?.map(\.string), !merges.contains(nil) else {
            throw bad(.missingKey, "tokenizer.ggml.merges is missing or not a list of strings")
        }
        var vocab = JSONObject(), added: [JSONValue] = []
        for (id, token) in tokens.enumerated() {
            let token = token!, type = types[id]!
            if type == Int(normal) {
                vocab[token] = .int(id)
            } else if type == Int(control) || (type == Int(userDefined) && !(token.hasPrefix("[PAD") && token.hasSuffix("]"))) {
                added.append(
                    .object(
                        JSONObject([
                            ("id", .int(id)), ("content", .string(token)), ("single_word", .bool(false)), ("lstrip", .bool(false)),
                            ("rstrip", .bool(false)), ("normalized", .bool(type != Int(control))), ("special", .bool(type == Int(control)))
                        ])))
            }
        }
        let pairs: [JSONValue] = try merges.map { (merge) throws(FormatError) -> JSONValue in
            let parts = merge!.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2 else { throw bad(.invalidValue, "merge '\(merge!)' is not two tokens") }
            return .array([.string(String(parts[0])), .string(String(parts[1]))])
        }
        let split = JSONObject([
            ("type", .string("Split")), ("pattern", .object(JSONObject([("Regex", .string(qwen2Pattern))]))),
            ("behavior", .string("Isolated")), ("invert", .bool(false))
        ])
        let byteLevel = JSONObject([
            ("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("trim_offsets", .bool(false)), ("use_regex", .bool(false))
        ])
        let tokenizer = JSONObject([
            ("version", .string("1.0")), ("truncation", .null), ("padding", .null), ("added_tokens", .array(added)),
            ("normalizer", .object(JSONObject([("type", .string("NFC"))]))),
            (
                "pre_tokenizer",
                .object(JSONObject([("type", .string("Sequence")), ("pretokenizers", .array([.object(split), .object(byteLevel)]))]))
            ),
            ("post_processor", .null),
            (
                "decoder",
                .object(
                    JSONObject([
                        ("type", .string("ByteLevel")), ("add_prefix_space", .bool(true)), ("trim_offsets", .bool(true)),
                        ("use_regex", .bool(true))
                    ]))
            ),
            (
                "model",
                .object(
                    JSONObject([
                        ("type", .string("BPE")), ("dropout", .null), ("unk_token", .null), ("continuing_subword_prefix", .null),
                        ("end_of_word_suffix", .null), ("fuse_unk", .bool(false)), ("byte_fallback", .bool(false)),
                        ("ignore_merges", .bool(false)), ("vocab", .object(vocab)), ("merges", .array(pairs))
                    ]))
            )
        ])
        var config = JSONObject([("tokenizer_class", .string("Qwen2Tokenizer"))])
        func token(_ key: String) -> JSONValue {
            guard let id = m["tokenizer.ggml.\(key)_token_id"]?.int, (0..<tokens.count).contains(id) else { return .null }
            return .string(tokens[id]!)
        }
        config["add_bos_token"] = .bool(m["tokenizer.ggml.add_bos_token"]?.bool ?? false)
        config["bos_token"] = token("bos")
        config["eos_token"] = token("eos")
        config["pad_token"] = token("padding")
        if let template = m["tokenizer.chat_template"]?.string { config["chat_template"] = .string(template) }
        return (Array(JSONWriter.serialize(.object(tokenizer)).utf8), Array(JSONWriter.serialize(.object(config), pretty: true).utf8))
    }
}
