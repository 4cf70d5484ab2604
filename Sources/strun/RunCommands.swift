import ArgumentParser
import Engine
import Format

/// Sizes and dtypes on the command line, with the libraries' own parsing.
extension ByteCount: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
}

extension KVCacheType: ExpressibleByArgument {}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Options every command that runs the model shares.
struct RuntimeOptions: ParsableArguments {
    @Option(name: [.customShort("t"), .long], help: "Threads (default: all cores).")
    var threads: Int?

    @Option(help: "Context length in tokens (default: the model's limit, at most 4096).")
    var context: Int?

    @Option(
        help: ArgumentHelp(
            "What the KV cache stores keys and values as (llama.cpp's -ctk/-ctv): f16 (half of f32's memory), q8_0 (about a quarter, "
                + "at a small measured cost), or f32.",
            valueName: "f32|f16|q8_0"))
    var kvType: KVCacheType = .default

    @Option(
        help: ArgumentHelp(
            "Run within this much memory, a size such as 1GiB, 800MB or 1073741824: experts are streamed from the package into a cache "
                + "of what the dense part leaves.",
            valueName: "BYTES"))
    var memoryBudget: ByteCount?

    @Flag(help: "With --memory-budget: read experts only when needed, not ahead while attention runs (for comparisons).")
    var noPrefetch = false

    @Option(
        help: ArgumentHelp(
            "With --memory-budget: also read the experts the next layer's router predicts from this layer's input, one layer early: on, "
                + "off, or auto (while at least half of those reads are used).",
            valueName: "on|off|auto"))
    var crossLayerPrefetch: String = "auto"

    func validate() throws {
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if let context, context < 1 { throw ValidationError("--context must be at least 1") }
        if noPrefetch && memoryBudget == nil { throw ValidationError("--no-prefetch goes with --memory-budget") }
        guard let mode = ExpertCache.CrossLayerMode(rawValue: crossLayerPrefetch) else {
            throw ValidationError("--cross-layer-prefetch takes on, off or auto (got '\(crossLayerPrefetch)')")
        }
        if mode == .on && noPrefetch { throw ValidationError("--cross-layer-prefetch on and --no-prefetch contradict each other") }
    }

    func session(_ path: String, contextLength: Int? = nil, sequences: Int = 1, kvType: KVCacheType? = nil) throws -> Session {
        try session(model: try model(path), contextLength: contextLength, sequences: sequences, kvType: kvType)
    }

    func model(_ path: String) throws -> Model {
        // Streaming experts reads their bundles as stored; arranging them at load is for the
        // whole-package mapping only.
        _ = try DotKernels.configured()  // a bad STRUN_KERNELS fails before a model is loaded
        let model = try Model(path: path, arrangeExperts: memoryBudget == nil)
        if model.matricesArrangedAtLoad > 0 {
            writeStandardError(
                "strun: note: \(model.matricesArrangedAtLoad) Q4_0 matrices of this package are stored in plain rows and were arranged in row groups "
                    + "at load; `stquant \(path) -o NEW.stpk --type q4_0` stores them grouped (faster to load, less memory)\n"
            )
        }
        return model
    }

    /// A session of `sequences` sequences on `model` with these options (`kvType` overriding
    /// --kv-type).
    func session(model: Model, contextLength: Int? = nil, sequences: Int = 1, kvType: KVCacheType? = nil) throws -> Session {
        let session = try Session(
            model: model, contextLength: contextLength ?? context, threads: threads ?? Session.defaultThreads,
            memoryBudget: memoryBudget?.bytes, sequences: sequences, kvType: kvType ?? self.kvType)
        session.expertCache?.prefetchEnabled = !noPrefetch
        session.expertCache?.crossLayer = noPrefetch ? .off : ExpertCache.CrossLayerMode(rawValue: crossLayerPrefetch) ?? .auto
        return session
    }
}

/// Parses "1,2,3" (commas and/or white space).
func parseTokens(_ text: String, option: String) throws -> [Int] {
    let parts = text.split { $0 == "," || $0 == " " || $0 == "\n" || $0 == "\t" }
    var tokens: [Int] = []
    for part in parts {
        guard let id = Int(part), id >= 0 else { throw ValidationError("\(option): '\(part)' is not a token id") }
        tokens.append(id)
    }
    guard !tokens.isEmpty else { throw ValidationError("\(option): no token ids") }
    return tokens
}

struct Logits: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write the logits of every position, computed one token at a time with the KV cache.",
        discussion: "The output is raw little-endian float32, row-major [tokens, vocab]."
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Option(help: "Token ids, e.g. 1,2,3.")
    var tokens: String

    @Option(name: .shortAndLong, help: "Where to write the logits.")
    var output: String

    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        let ids = try parseTokens(tokens, option: "--tokens")
        try reportingErrors {
            let session = try runtime.session(package)
            // Each position's logits are written as they come: the file can be far larger than
            // the model's working memory (a 4B vocabulary is 0.6 MB a position).
            let file = try AtomicOutput(output)
            for id in ids {
                let logits = try session.evaluate([id])
                let result: Result<Void, FormatError> = logits.withUnsafeBytes { raw in
                    Result { () throws(FormatError) in try file.append(raw) }
                }
                try result.get()
            }
            try file.commit()
        }
    }
}

/// Sampling flags; unset ones come from the package's generation_config.json, else the
/// authors' recommendation (temperature 0.6, top-k 20, top-p 0.95).
struct SamplingOptions: ParsableArguments {
    @Option(help: "Sampling temperature; 0 is greedy.")
    var temperature: Float?

    @Option(help: "Keep the k most likely tokens (0: all).")
    var topK: Int?

    @Option(help: "Keep the most likely tokens up to this total probability.")
    var topP: Float?

    @Option(help: "Drop tokens less likely than this fraction of the most likely one.")
    var minP: Float?

    @Option(help: "Penalise tokens already seen (1: off).")
    var repetitionPenalty: Float?

    @Option(help: "Lower a token's logit by this times the times it was generated (OpenAI's frequency_penalty; 0: off).")
    var frequencyPenalty: Float?

    @Option(help: "Lower a token's logit by this once it was generated (OpenAI's presence_penalty; 0: off).")
    var presencePenalty: Float?

    @Option(help: "Random seed (same seed, same output).")
    var seed: UInt64 = 0

    func validate() throws {
        if let temperature, temperature < 0 { throw ValidationError("--temperature must not be negative") }
        if let topP, !(topP > 0 && topP <= 1) { throw ValidationError("--top-p must be in (0, 1]") }
        if let minP, !(minP >= 0 && minP < 1) { throw ValidationError("--min-p must be in [0, 1)") }
        if let topK, topK < 0 { throw ValidationError("--top-k must not be negative") }
        if let repetitionPenalty, repetitionPenalty <= 0 { throw ValidationError("--repetition-penalty must be positive") }
        for (name, value) in [("--frequency-penalty", frequencyPenalty), ("--presence-penalty", presencePenalty)] {
            if let value, !(-2...2).contains(value) { throw ValidationError("\(name) must be from -2 to 2") }
        }
    }

    func parameters(for model: Model) -> SamplingParameters {
        var p = SamplingParameters.defaults(generationConfig: model.package.fileContents("generation_config.json"))
        if let temperature { p.temperature = temperature }
        if let topK { p.topK = topK }
        if let topP { p.topP = topP }
        if let minP { p.minP = minP }
        if let repetitionPenalty { p.repetitionPenalty = repetitionPenalty }
        if let frequencyPenalty { p.frequencyPenalty = frequencyPenalty }
        if let presencePenalty { p.presencePenalty = presencePenalty }
        p.seed = seed
        return p
    }
}

/// The tokenizer embedded in a package (read from the package alone, no model built), or one
/// given with --tokenizer.
func loadTokenizer(package: PackageReader?, override path: String?) throws -> Tokenizer {
    if let path { return try Tokenizer(path: path) }
    guard let package else { throw TokenizerError.missing }
    return try Tokenizer(package: package)
}

/// Prints text as it arrives (no newline, flushed).
func emitText(_ text: String) {
    print(text, terminator: "")
    fflush(nil)
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text (or token ids) after a prompt.",
        discussion:
            "Text is streamed as it is produced. Stops after -n tokens, at <|im_end|> or <|endoftext|>, at the model's EOS ids, or at a "
            + "--stop string."
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Option(name: .shortAndLong, help: "The prompt text.")
    var prompt: String?

    @Option(help: "Prompt token ids instead of text, e.g. 1,2,3.")
    var tokens: String?

    @Flag(help: "Wrap the prompt in the ChatML template (system prompt, user turn, assistant opening).")
    var chat = false

    @Option(help: "System prompt for --chat (default: \"\(ChatTemplate.defaultSystemPrompt)\").")
    var system: String?

    @Flag(help: "No system prompt with --chat.")
    var noSystem = false

    @Option(name: .shortAndLong, help: "Most tokens to generate.")
    var n: Int = 256

    @Option(help: "Stop when the output contains this text (repeatable; the text is not printed).")
    var stop: [String] = []

    @Flag(help: "Print the generated token ids, space-separated, on one line, instead of text.")
    var ids = false

    @Flag(help: "Do not stop at end-of-sequence tokens.")
    var ignoreEOS = false

    @Option(help: "Use this tokenizer.json instead of the package's.")
    var tokenizer: String?

    @OptionGroup var sampling: SamplingOptions
    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if n < 0 { throw ValidationError("-n must not be negative") }
        if (prompt == nil) == (tokens == nil) { throw ValidationError("give the prompt as text (-p) or as --tokens ids") }
        if chat && tokens != nil { throw ValidationError("--chat needs a text prompt (-p)") }
        if system != nil && noSystem { throw ValidationError("--system and --no-system contradict each other") }
    }

    func run() throws {
        let promptIDs = try tokens.map { try parseTokens($0, option: "--tokens") }
        try reportingErrors {
            let session = try runtime.session(package)
            let model = session.model
            let parameters = sampling.parameters(for: model)
            if ids && prompt == nil && tokenizer == nil && model.package.fileContents("tokenizer.json") == nil {
                // Token ids in, token ids out: no tokenizer needed.
                var generator = TokenGenerator(session: session, sampling: parameters)
                if ignoreEOS { generator.stopTokens = [] }
                let generated = n == 0 ? [] : try generator.run(prompt: promptIDs!, maximumTokens: n) { _ in nil }.ids
                print(generated.map(String.init).joined(separator: " "))
                return
            }
            let tok = try loadTokenizer(package: model.package, override: tokenizer)
            var generator = TextGenerator(session: session, tokenizer: tok, sampling: parameters, stopStrings: stop)
            if ignoreEOS { generator.stopTokens = [] }
            let text =
                chat ? ChatTemplate.prompt(user: prompt!, system: noSystem ? nil : (system ?? ChatTemplate.defaultSystemPrompt)) : prompt
            let input = promptIDs ?? tok.encode(text!)
            let (generated, reason) = try generator.run(prompt: input, maximumTokens: n) { piece in
                if !ids { emitText(piece) }
            }
            if ids {
                print(generated.map(String.init).joined(separator: " "))
            } else {
                print("")
                if reason == .contextFull {
                    writeStandardError("strun: note: stopped: the context is full (\(session.contextLength) tokens)\n")
                }
            }
        }
    }
}

struct Chat: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Talk with the model. Type a message and press return.",
        discussion: "Commands: /reset starts over, /quit (or end of input) leaves. Works through a pipe too: one message per line."
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Option(help: "System prompt (default: \"\(ChatTemplate.defaultSystemPrompt)\").")
    var system: String?

    @Flag(help: "No system prompt.")
    var noSystem = false

    @Option(name: .shortAndLong, help: "Most tokens per reply.")
    var n: Int = 512

    @Option(help: "Use this tokenizer.json instead of the package's.")
    var tokenizer: String?

    @OptionGroup var sampling: SamplingOptions
    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if n < 1 { throw ValidationError("-n must be at least 1") }
        if system != nil && noSystem { throw ValidationError("--system and --no-system contradict each other") }
    }

    func run() throws {
        try reportingErrors {
            let session = try runtime.session(package)
            let tok = try loadTokenizer(package: session.model.package, override: tokenizer)
            let generator = TextGenerator(session: session, tokenizer: tok, sampling: sampling.parameters(for: session.model))
            let conversation = Conversation(generator: generator, system: noSystem ? nil : (system ?? ChatTemplate.defaultSystemPrompt))
            let interactive = isatty(0) != 0
            if interactive { print("Chatting with \(package). /reset starts over, /quit leaves.") }
            while true {
                if interactive { emitText("> ") }
                guard let line = readLine(strippingNewline: true) else { break }
                let text = line.trimmingWhitespace
                if text.isEmpty { continue }
                if text == "/quit" || text == "/exit" { break }
                if text == "/reset" {
                    conversation.reset()
                    print("(conversation reset)")
                    continue
                }
                do {
                    let reason = try conversation.reply(to: text, maximumTokens: n) { emitText($0) }
                    print("")
                    if reason == .contextFull {
                        print("(the context is full: \(session.contextLength) tokens; /reset to start over)")
                    }
                } catch EngineError.contextFull(let limit) {
                    print("(the context is full: \(limit) tokens; /reset to start over)")
                }
            }
        }
    }
}

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the token ids of a text as a JSON array.")

    @Argument(help: "A .stpk package with an embedded tokenizer (or use --tokenizer).")
    var package: String?

    @Option(help: "A tokenizer.json to use instead of a package.")
    var tokenizer: String?

    @Option(help: "The text.")
    var text: String?

    @Option(help: "A file whose contents are the text.")
    var file: String?

    func validate() throws {
        if (package == nil) == (tokenizer == nil) { throw ValidationError("give a package or --tokenizer, not both") }
        if (text == nil) == (file == nil) { throw ValidationError("give --text or --file") }
    }

    func run() throws {
        try reportingErrors {
            let tok = try loadTokenizer(package: try package.map { try PackageReader(path: $0) }, override: tokenizer)
            let input: String
            if let text {
                input = text
            } else {
                let bytes = try FileSystem.readAll(file!, limit: 1 << 30)
                guard let decoded = String(validating: bytes, as: UTF8.self) else {
                    throw ValidationError("\(file!) is not valid UTF-8 text")
                }
                input = decoded
            }
            print("[" + tok.encode(input).map(String.init).joined(separator: ",") + "]")
        }
    }
}

struct Detokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the text of token ids.")

    @Argument(help: "A .stpk package with an embedded tokenizer (or use --tokenizer).")
    var package: String?

    @Option(help: "A tokenizer.json to use instead of a package.")
    var tokenizer: String?

    @Option(help: "Token ids, e.g. 1,2,3.")
    var ids: String

    @Flag(help: "Leave out special tokens such as <|im_end|>.")
    var skipSpecialTokens = false

    func validate() throws {
        if (package == nil) == (tokenizer == nil) { throw ValidationError("give a package or --tokenizer, not both") }
    }

    func run() throws {
        let list = try parseTokens(ids, option: "--ids")
        try reportingErrors {
            let tok = try loadTokenizer(package: try package.map { try PackageReader(path: $0) }, override: tokenizer)
            print(try tok.decode(list, skipSpecialTokens: skipSpecialTokens))
        }
    }
}

extension String {
    var trimmingWhitespace: String {
        let scalars = unicodeScalars
        guard let first = scalars.firstIndex(where: { !$0.properties.isWhitespace }) else { return "" }
        let last = scalars.lastIndex(where: { !$0.properties.isWhitespace })!
        return String(scalars[first...last])
    }
}

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare two packages' predictions over the same tokens (KL divergence, top-1 agreement, perplexity).",
        discussion:
            "BASE is the reference (usually the float package). The tokens come from --text or --file (through BASE's tokenizer), "
            + "--tokens or --tokens-file; without any, a fixed pseudo-random sequence of 128 ids is used, which says little about a "
            + "trained model. BASE and OTHER may be the same package: `--base-kv-type f32 --kv-type q8_0` measures what a KV cache "
            + "type costs."
    )

    @Argument(help: "The reference package.")
    var base: String

    @Argument(help: "The package to judge.")
    var other: String

    @OptionGroup var input: InputTokens

    @Flag(help: "Print JSON.")
    var json = false

    @Option(help: ArgumentHelp("BASE's KV cache type (default: --kv-type's).", valueName: "f32|f16|q8_0"))
    var baseKVType: KVCacheType?

    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        try reportingErrors {
            let baseSession = try runtime.session(base, kvType: baseKVType)
            let otherSession = try runtime.session(other)
            let vocab = baseSession.model.config.vocabSize
            guard otherSession.model.config.vocabSize == vocab else {
                throw EngineError.vocabularyMismatch(vocab, otherSession.model.config.vocabSize)
            }
            var ids: [Int]
            if input.given {
                ids = try input.ids(for: baseSession.model)
                guard ids.count <= baseSession.contextLength else {
                    throw EngineError.inputTooLong(tokens: ids.count, context: baseSession.contextLength)
                }
            } else {
                var random = SplitMix64(seed: 20_250_701)
                ids = (0..<min(128, baseSession.contextLength)).map { _ in Int(random.next() % UInt64(vocab)) }
            }
            let a = try baseSession.evaluate(ids, allLogits: true)
            let b = try otherSession.evaluate(ids, allLogits: true)
            let c = LogitComparison(base: a, other: b, vocab: vocab, tokens: ids)
            if json {
                print(
                    JSONWriter.serialize(
                        .object(
                            JSONObject([
                                ("positions", .int(c.positions)), ("mean_kl", .double(c.meanKL)), ("p99_kl", .double(c.p99KL)),
                                ("max_kl", .double(c.maxKL)), ("top1_agreement", .double(c.top1Agreement)),
                                ("max_abs_logit_difference", .double(Double(c.maxAbsoluteDifference))),
                                ("base_perplexity", .double(c.basePerplexity)), ("other_perplexity", .double(c.otherPerplexity))
                            ])), pretty: true))
            } else {
                print(
                    """
                    positions:               \(c.positions)
                    mean KL(base ‖ other):   \(c.meanKL)
                    99th percentile KL:      \(c.p99KL)
                    max KL:                  \(c.maxKL)
                    top-1 agreement:         \(c.top1Agreement * 100)%
                    max |logit difference|:  \(c.maxAbsoluteDifference)
                    perplexity (base):       \(c.basePerplexity)
                    perplexity (other):      \(c.otherPerplexity)
                    """)
            }
        }
    }
}
