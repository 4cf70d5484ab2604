import ArgumentParser
import Engine

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure prompt and decode speed, time to first token and peak memory.",
        discussion:
            "Prompt: -p seeded random token ids evaluated as one prompt. Decode: -n tokens generated greedily one at a time after it. "
            + "Each figure is the median over --repetitions runs."
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Option(name: .customShort("p"), help: "Prompt tokens.")
    var promptTokens: Int = 128

    @Option(name: .customShort("n"), help: "Tokens to decode.")
    var decodeTokens: Int = 64

    @Option(name: .shortAndLong, help: "Runs to take the median of.")
    var repetitions: Int = 3

    @Option(
        help: ArgumentHelp(
            "Run on the text of this file instead of random ids: its first -p tokens are the prompt and each decode step feeds its next "
                + "token (not the greedy choice), so routing and the expert cache see real text.",
            valueName: "FILE"))
    var textFile: String?

    @Flag(help: "Print JSON.")
    var json = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if promptTokens < 1 || decodeTokens < 1 || repetitions < 1 { throw ValidationError("-p, -n and --repetitions must be at least 1") }
    }

    func run() throws {
        try reportingErrors {
            let loadStart = ProgressReporter.monotonicSeconds()
            let session = try runtime.session(package, contextLength: runtime.context ?? (promptTokens + decodeTokens))
            let model = session.model
            let loadSeconds = ProgressReporter.monotonicSeconds() - loadStart
            var random = SplitMix64(seed: 1)
            var prompt = (0..<promptTokens).map { _ in Int(random.next() % UInt64(model.config.vocabSize)) }
            var script: [Int]? = nil
            if let textFile {
                let ids = try encodeTextFile(textFile, for: model, tokenizer: nil, option: "--text-file")
                guard ids.count >= promptTokens + decodeTokens else {
                    throw ValidationError(
                        "\(textFile) encodes to \(ids.count) tokens; -p \(promptTokens) and -n \(decodeTokens) need "
                            + "\(promptTokens + decodeTokens)"
                    )
                }
                prompt = Array(ids[..<promptTokens])
                script = Array(ids[promptTokens..<promptTokens + decodeTokens])
            }
            var promptRates: [Double] = [], decodeRates: [Double] = [], firstToken: [Double] = []
            var decodeStats = ExpertCache.Statistics()
            for _ in 0..<repetitions {
                session.reset()
                let start = ProgressReporter.monotonicSeconds()
                var logits = try session.evaluate(prompt)
                var next = LogitComparison.argmax(logits[...])
                let prompted = ProgressReporter.monotonicSeconds()
                promptRates.append(Double(promptTokens) / (prompted - start))
                firstToken.append(prompted - start)
                session.expertCache?.resetStatistics()
                for step in 0..<decodeTokens {
                    logits = try session.evaluate([script?[step] ?? next])
                    next = LogitComparison.argmax(logits[...])
                }
                decodeRates.append(Double(decodeTokens) / (ProgressReporter.monotonicSeconds() - prompted))
                if let stats = session.expertCache?.statistics { decodeStats = stats }
            }
            let cache = session.expertCache
            let perToken = Double(decodeTokens)
            func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
            let peak = peakResidentBytes()
            let threads = session.threads
            if json {
                print(
                    JSONWriter.serialize(
                        .object(
                            JSONObject([
                                ("package", .string(package)), ("threads", .int(threads)),
                                ("kernels", .string(session.kernels.name)), ("kernels_forced", .bool(DotKernels.forcedByEnvironment)),
                                ("cpu", DotKernels.cpuModel.map { .string($0) } ?? .null),
                                ("prompt_tokens", .int(promptTokens)), ("decode_tokens", .int(decodeTokens)),
                                ("repetitions", .int(repetitions)),
                                ("prompt_tokens_per_second", .double(median(promptRates))),
                                ("decode_tokens_per_second", .double(median(decodeRates))),
                                ("time_to_first_token_seconds", .double(median(firstToken))),
                                ("load_seconds", .double(loadSeconds)), ("peak_rss_bytes", .int(peak)),
                                ("memory_budget_bytes", runtime.memoryBudget.map { .int($0.bytes) } ?? .null),
                                ("minimum_memory_budget_bytes", .int(session.minimumMemoryBudget)),
                                ("expert_cache_bytes", cache.map { .int($0.capacityBytes) } ?? .null),
                                ("prefetch", cache.map { .bool($0.prefetchEnabled) } ?? .null),
                                ("direct_io", cache.map { .bool($0.directIO) } ?? .null),
                                ("expert_hit_rate", cache.map { _ in .double(decodeStats.hitRate) } ?? .null),
                                (
                                    "expert_bytes_read_per_token",
                                    cache.map { _ in .double(Double(decodeStats.bytesRead) / perToken) } ?? .null
                                ),
                                ("io_stall_seconds_per_token", cache.map { _ in .double(decodeStats.stallSeconds / perToken) } ?? .null),
                                ("cross_layer_prefetch", cache.map { .string($0.crossLayer.rawValue) } ?? .null),
                                ("expert_hits", cache.map { _ in .int(decodeStats.hits) } ?? .null),
                                ("expert_misses", cache.map { _ in .int(decodeStats.misses) } ?? .null),
                                ("expert_bytes_read", cache.map { _ in .int(decodeStats.bytesRead) } ?? .null),
                                ("expert_bundle_bytes", cache.map { .int($0.slotBytes) } ?? .null),
                                ("speculative_reads", cache.map { _ in .int(decodeStats.speculativeReads) } ?? .null),
                                ("speculative_cancelled", cache.map { _ in .int(decodeStats.speculativeCancelled) } ?? .null),
                                ("speculative_used", cache.map { _ in .int(decodeStats.speculativeUsed) } ?? .null),
                                ("speculative_wasted", cache.map { _ in .int(decodeStats.speculativeWasted) } ?? .null)
                            ])), pretty: true))
            } else {
                print(
                    """
                    \(package): \(threads) threads, median of \(repetitions)
                    kernels: \(DotKernels.describe(session.kernels))
                    prompt:  \(promptTokens) tokens at \(String(format2: median(promptRates))) tokens/s
                    decode:  \(decodeTokens) tokens at \(String(format2: median(decodeRates))) tokens/s
                    time to first token: \(String(format2: median(firstToken) * 1000)) ms (load \(String(format2: loadSeconds * 1000)) ms)
                    peak RSS: \(PackageSummary.bytes(peak)) (smallest --memory-budget at this context: \(PackageSummary.bytes(session.minimumMemoryBudget)))
                    """)
                if let cache {
                    print(
                        "expert cache: \(PackageSummary.bytes(cache.capacityBytes)) (\(cache.slotCount) bundles), "
                            + "\(cache.directIO ? "direct I/O" : "buffered reads, pages dropped"), prefetch "
                            + "\(cache.prefetchEnabled ? "on" : "off"), cross-layer prefetch \(cache.crossLayer.rawValue)"
                    )
                    print(
                        "decode: hit rate \(String(format2: decodeStats.hitRate * 100))%, "
                            + "\(PackageSummary.bytes(Int(Double(decodeStats.bytesRead) / perToken))) read per token, "
                            + "\(String(format2: decodeStats.stallSeconds / perToken * 1000)) ms stalled on I/O per token"
                    )
                    if decodeStats.speculativeReads > 0 {
                        print(
                            "speculative reads: \(decodeStats.speculativeReads) read, \(decodeStats.speculativeUsed) used, "
                                + "\(decodeStats.speculativeWasted) evicted unused, \(decodeStats.speculativeCancelled) cancelled before "
                                + "reading"
                        )
                    }
                }
            }
        }
    }
}
