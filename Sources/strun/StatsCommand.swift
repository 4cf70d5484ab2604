import ArgumentParser
import Engine

/// Where a command's input tokens come from: ids, a file of ids, text, or a text file (text
/// through the package's tokenizer or --tokenizer).
struct InputTokens: ParsableArguments {
    @Option(help: "Token ids, e.g. 1,2,3.")
    var tokens: String?

    @Option(help: "A file of token ids (commas or white space).")
    var tokensFile: String?

    @Option(help: "Text, encoded with the package's tokenizer.")
    var text: String?

    @Option(help: "A UTF-8 text file, encoded with the package's tokenizer.")
    var file: String?

    @Option(help: "Use this tokenizer.json for --text and --file instead of the package's.")
    var tokenizer: String?

    var given: Bool { tokens != nil || tokensFile != nil || text != nil || file != nil }

    func validate() throws {
        if [tokens != nil, tokensFile != nil, text != nil, file != nil].filter({ $0 }).count > 1 {
            throw ValidationError("give one of --tokens, --tokens-file, --text and --file")
        }
    }

    /// The ids, checked against the model's vocabulary.
    func ids(for model: Model) throws -> [Int] {
        var ids: [Int]
        if let tokens {
            ids = try parseTokens(tokens, option: "--tokens")
        } else if let tokensFile {
            ids = try parseTokens(
                String(decoding: try FileSystem.readAll(tokensFile, limit: 64 << 20), as: UTF8.self), option: "--tokens-file")
        } else if let text {
            ids = try encodeText(text, for: model, tokenizer: tokenizer, option: "--text")
        } else {
            ids = try encodeTextFile(file!, for: model, tokenizer: tokenizer, option: "--file")
        }
        if let bad = ids.first(where: { $0 >= model.config.vocabSize }) {
            throw EngineError.invalidToken(id: bad, vocabularySize: model.config.vocabSize)
        }
        return ids
    }
}

/// Text through the package's tokenizer (or `tokenizer`, a tokenizer.json path).
func encodeText(_ text: String, for model: Model, tokenizer: String?, option: String) throws -> [Int] {
    let ids = try loadTokenizer(package: model.package, override: tokenizer).encode(text)
    guard !ids.isEmpty else { throw ValidationError("\(option) encodes to no tokens") }
    return ids
}

/// A UTF-8 text file through the package's tokenizer.
func encodeTextFile(_ path: String, for model: Model, tokenizer: String?, option: String) throws -> [Int] {
    try encodeText(
        String(decoding: FileSystem.readAll(path, limit: 64 << 20), as: UTF8.self), for: model, tokenizer: tokenizer, option: option)
}

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure how the model routes over some text: expert use, idle neurons, cross-layer prediction.",
        discussion: """
            Per layer: the share of routings taken by the most used quarter of the experts (0.25 is uniform), \
            experts never chosen, the fraction of chosen experts' ReGLU neurons with gate ≤ 0 (idle: their up \
            and down rows do nothing), and, from the second layer on, how well this layer's router applied to \
            the previous layer's input predicts this layer's choice (what a cross-layer prefetch could read \
            one layer early): the mean share of the true top k it finds, and how often it finds the true \
            choice of each rank. Text longer than --context is taken in windows.
            """
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @OptionGroup var input: InputTokens

    @Flag(help: "Print JSON.")
    var json = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if !input.given { throw ValidationError("give the text to measure on: --text, --file, --tokens or --tokens-file") }
    }

    func run() throws {
        try reportingErrors {
            let session = try runtime.session(package)
            let ids = try input.ids(for: session.model)
            let statistics = RoutingStatistics(session: session)
            try statistics.feed(ids)
            let report = statistics.report
            if json {
                print(
                    JSONWriter.serialize(
                        .object(
                            JSONObject([
                                ("tokens", .int(report.tokens)), ("experts", .int(report.experts)), ("active", .int(report.active)),
                                (
                                    "layers",
                                    .array(
                                        report.layers.map { layer in
                                            .object(
                                                JSONObject([
                                                    ("layer", .int(layer.layer)),
                                                    ("expert_counts", .array(layer.expertCounts.map { .int($0) })),
                                                    ("top_quarter_share", .double(layer.topQuarterShare)),
                                                    ("unused_experts", .int(layer.unusedExperts)),
                                                    ("idle_neuron_fraction", .double(layer.idleNeuronFraction)),
                                                    ("predicted_recall", layer.predictedRecall.map { .double($0) } ?? .null),
                                                    (
                                                        "predicted_by_rank",
                                                        layer.predictedByRank.map { .array($0.map { .double($0) }) } ?? .null
                                                    )
                                                ]))
                                        })
                                )
                            ])), pretty: true))
                return
            }
            func percent(_ v: Double) -> String { String(Int((v * 100).rounded())) + "%" }
            func pad(_ s: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - s.count)) + s }
            print(
                "\(report.tokens) tokens; \(report.experts) experts, \(report.active) chosen per token; uniform use would give the top "
                    + "quarter 25%"
            )
            print("layer  top quarter  unused  idle neurons  predicted from the previous layer's input: found, by rank (best first)")
            for layer in report.layers {
                var line =
                    pad(String(layer.layer), 5) + pad(percent(layer.topQuarterShare), 13) + pad(String(layer.unusedExperts), 8)
                    + pad(percent(layer.idleNeuronFraction), 14)
                if let recall = layer.predictedRecall, let ranks = layer.predictedByRank {
                    line += pad(percent(recall), 9) + "   " + ranks.map(percent).joined(separator: " ")
                }
                print(line)
            }
        }
    }
}
