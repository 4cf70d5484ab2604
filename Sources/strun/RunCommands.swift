import ArgumentParser
import Engine

#if canImport(Glibc)
import Glibc
#endif

/// Options every command that runs the model shares.
struct RuntimeOptions: ParsableArguments {
    @Option(name: [.customShort("t"), .long], help: "Threads (default: all cores).")
    var threads: Int?

    @Option(help: "Context length in tokens (default: the model's limit, at most 4096).")
    var context: Int?

    func validate() throws {
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if let context, context < 1 { throw ValidationError("--context must be at least 1") }
    }

    func session(_ path: String) throws -> Session {
        let model = try Model(path: path)
        return try Session(model: model, contextLength: context, threads: threads ?? Session.defaultThreads)
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
            var all: [Float] = []
            all.reserveCapacity(ids.count * session.model.config.vocabSize)
            for id in ids { all += try session.evaluate([id]) }
            let bytes = all.withUnsafeBytes { Array($0) }
            try FileSystem.writeAtomically(bytes, to: output)
        }
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate tokens after a prompt.",
        discussion: "Greedy with --temperature 0. Stops after -n tokens or at an end-of-sequence token."
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Option(help: "Prompt token ids, e.g. 1,2,3.")
    var tokens: String

    @Option(name: .shortAndLong, help: "Most tokens to generate.")
    var n: Int = 64

    @Option(help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0.6

    @Option(help: "Keep the k most likely tokens (0: all).")
    var topK: Int = 20

    @Option(help: "Keep the most likely tokens up to this total probability.")
    var topP: Float = 0.95

    @Option(help: "Drop tokens less likely than this fraction of the most likely one.")
    var minP: Float = 0

    @Option(help: "Penalise tokens already seen (1: off).")
    var repetitionPenalty: Float = 1

    @Option(help: "Random seed (same seed, same output).")
    var seed: UInt64 = 0

    @Flag(help: "Print the generated token ids, space-separated, on one line.")
    var ids = false

    @Flag(help: "Do not stop at end-of-sequence tokens.")
    var ignoreEOS = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if n < 0 { throw ValidationError("-n must not be negative") }
        if temperature < 0 { throw ValidationError("--temperature must not be negative") }
        if !(topP > 0 && topP <= 1) { throw ValidationError("--top-p must be in (0, 1]") }
        if !ids { throw ValidationError("this package runs on token ids for now: pass --ids (text prompts need the tokenizer)") }
    }

    func run() throws {
        let prompt = try parseTokens(tokens, option: "--tokens")
        try reportingErrors {
            let session = try runtime.session(package)
            var parameters = SamplingParameters()
            parameters.temperature = temperature
            parameters.topK = topK
            parameters.topP = topP
            parameters.minP = minP
            parameters.repetitionPenalty = repetitionPenalty
            parameters.seed = seed
            var sampler = Sampler(parameters)
            let stops = Set(session.model.config.eosTokenIDs)
            var history = prompt
            var generated: [Int] = []
            guard n > 0 else { print(""); return }
            var logits = try session.evaluate(prompt)
            while generated.count < n {
                let next = sampler.sample(logits[...], history: history)
                generated.append(next)
                history.append(next)
                if !ignoreEOS && stops.contains(next) { break }
                if generated.count == n { break }
                if session.position >= session.contextLength {
                    writeStandardError("strun: note: the context is full (\(session.contextLength) tokens); stopping\n")
                    break
                }
                logits = try session.evaluate([next])
            }
            print(generated.map(String.init).joined(separator: " "))
        }
    }
}

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare two packages' predictions over the same tokens (KL divergence, top-1 agreement, perplexity).",
        discussion: "BASE is the reference (usually the float package). Without --tokens or --tokens-file, a fixed pseudo-random sequence of 128 ids is used."
    )

    @Argument(help: "The reference package.")
    var base: String

    @Argument(help: "The package to judge.")
    var other: String

    @Option(help: "Token ids, e.g. 1,2,3.")
    var tokens: String?

    @Option(help: "A file of token ids (commas or white space).")
    var tokensFile: String?

    @Flag(help: "Print JSON.")
    var json = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if tokens != nil && tokensFile != nil { throw ValidationError("give --tokens or --tokens-file, not both") }
    }

    func run() throws {
        try reportingErrors {
            let baseSession = try runtime.session(base)
            let otherSession = try runtime.session(other)
            let vocab = baseSession.model.config.vocabSize
            guard otherSession.model.config.vocabSize == vocab else {
                throw EngineError.invalidRequest("the packages have different vocabularies (\(vocab) and \(otherSession.model.config.vocabSize)); compare packages of the same model")
            }
            var ids: [Int]
            if let tokens {
                ids = try parseTokens(tokens, option: "--tokens")
            } else if let tokensFile {
                let bytes = try FileSystem.readAll(tokensFile, limit: 64 << 20)
                ids = try parseTokens(String(decoding: bytes, as: UTF8.self), option: "--tokens-file")
            } else {
                var random = SplitMix64(seed: 20_250_701)
                ids = (0..<min(128, baseSession.contextLength)).map { _ in Int(random.next() % UInt64(vocab)) }
            }
            let a = try baseSession.evaluate(ids, allLogits: true)
            let b = try otherSession.evaluate(ids, allLogits: true)
            let c = LogitComparison(base: a, other: b, vocab: vocab, tokens: ids)
            if json {
                print(JSONWriter.serialize(.object(JSONObject([
                    ("positions", .int(c.positions)), ("mean_kl", .double(c.meanKL)), ("p99_kl", .double(c.p99KL)),
                    ("max_kl", .double(c.maxKL)), ("top1_agreement", .double(c.top1Agreement)),
                    ("max_abs_logit_difference", .double(Double(c.maxAbsoluteDifference))),
                    ("base_perplexity", .double(c.basePerplexity)), ("other_perplexity", .double(c.otherPerplexity)),
                ])), pretty: true))
            } else {
                print("""
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
