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
            + "Each figure is the median over --repetitions runs.\n\n"
            + "--parallel N (or a list, 1,2,4,8) runs N sequences at once, as llama-batched-bench -npp P -ntg N -npl N does: N prompts "
            + "of -p different random tokens, evaluated in forward steps of up to 128 tokens, then -n steps that each decode one token "
            + "of every sequence. It reports aggregate prompt and decode tokens/s, each sequence's decode tokens/s, and the bytes of "
            + "weights a decode step reads (the dense matrices once, plus each distinct chosen expert's bundle once)."
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

    @Option(
        help: ArgumentHelp(
            "Sequences decoded at once, or a comma-separated list of counts to measure one after another.", valueName: "N[,N...]"))
    var parallel: String?

    @Flag(help: "Print JSON.")
    var json = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if promptTokens < 1 || decodeTokens < 1 || repetitions < 1 { throw ValidationError("-p, -n and --repetitions must be at least 1") }
        if parallel != nil {
            _ = try parallelCounts()
            if textFile != nil { throw ValidationError("--text-file and --parallel cannot be combined") }
        }
    }

    func parallelCounts() throws -> [Int] {
        let counts = (parallel ?? "").split(separator: ",").map { Int($0.filter { $0 != " " }) }
        guard !counts.isEmpty, let valid = counts as? [Int], valid.allSatisfy({ (1...Session.maximumBatch).contains($0) }) else {
            throw ValidationError(
                "--parallel takes counts from 1 to \(Session.maximumBatch), one or a comma-separated list (got '\(parallel ?? "")')")
        }
        return valid
    }

    func run() throws {
        if parallel != nil { return try runParallel() }
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
            // Decoding reads, per token, the keys and values of every position it sees: on
            // average those at the middle of the decode.
            let kvRead = session.memoryPlan.kvBytesRead(depth: promptTokens + decodeTokens / 2)
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
                                ("kv_type", .string(session.kvType.rawValue)), ("kv_cache_bytes", .int(session.memoryPlan.kvCacheBytes)),
                                ("kv_bytes_per_token", .int(session.memoryPlan.kvBytesPerToken)),
                                ("kv_bytes_read_per_decoded_token", .int(kvRead)),
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
                    KV cache: \(session.kvType), \(PackageSummary.bytes(session.memoryPlan.kvCacheBytes)) for \(session.contextLength) positions (\(PackageSummary.bytes(session.memoryPlan.kvBytesPerToken)) a token); a decoded token reads \(PackageSummary.bytes(kvRead)) of it on average
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

extension Bench {
    /// One `--parallel` measurement.
    struct ParallelRun {
        var sequences: Int
        var prompt: Double  // aggregate prompt tokens/s
        var decode: Double  // aggregate decode tokens/s
        var firstToken: Double  // seconds until every sequence has its first token
        var expertsPerStep: Double  // distinct experts a decode step chose, over all layers
        var bytesPerStep: Double  // weights a decode step read
    }

    func runParallel() throws {
        try reportingErrors {
            let counts = try parallelCounts()
            let model = try runtime.model(package)
            var runs: [ParallelRun] = []
            var last: Session? = nil
            for n in counts {
                last = nil  // one session's caches at a time
                let session = try runtime.session(
                    model: model, contextLength: runtime.context ?? (promptTokens + decodeTokens), sequences: n)
                runs.append(try measure(session, sequences: n))
                last = session
            }
            report(runs, session: last!)
        }
    }

    /// Medians over the repetitions of `sequences` sequences: their prompts in steps of up to
    /// `Session.maximumBatch` tokens, then `decodeTokens` steps of one token each.
    private func measure(_ session: Session, sequences n: Int) throws -> ParallelRun {
        let vocab = session.model.config.vocabSize
        var random = SplitMix64(seed: 1)
        let prompts = (0..<n).map { _ in (0..<promptTokens).map { _ in Int(random.next() % UInt64(vocab)) } }
        var promptRates: [Double] = [], decodeRates: [Double] = [], firstTokens: [Double] = [], experts: [Double] = []
        let logits = UnsafeMutableBufferPointer<Float>.allocate(capacity: n * vocab)
        defer { logits.deallocate() }
        var next = [Int](repeating: 0, count: n)
        for _ in 0..<repetitions {
            session.reset()
            let start = ProgressReporter.monotonicSeconds()
            // Prompts: as many tokens per step as a batch holds, sequence after sequence.
            var fed = [Int](repeating: 0, count: n), s = 0
            while s < n {
                var chunks: [SequenceChunk] = [], room = Session.maximumBatch
                while s < n && room > 0 {
                    let take = min(room, promptTokens - fed[s])
                    let done = fed[s] + take == promptTokens
                    chunks.append(
                        SequenceChunk(sequence: s, tokens: Array(prompts[s][fed[s]..<fed[s] + take]), logits: done ? .last : .none))
                    fed[s] += take
                    room -= take
                    if done { s += 1 }
                }
                try session.evaluate(chunks, into: logits)
                var row = 0
                for chunk in chunks where chunk.logits == .last {
                    next[chunk.sequence] = LogitComparison.argmax(logits[row * vocab..<(row + 1) * vocab])
                    row += 1
                }
            }
            let prompted = ProgressReporter.monotonicSeconds()
            promptRates.append(Double(n * promptTokens) / (prompted - start))
            firstTokens.append(prompted - start)
            session.resetStepStatistics()
            session.expertCache?.resetStatistics()
            for _ in 0..<decodeTokens {
                try session.evaluate((0..<n).map { SequenceChunk(sequence: $0, tokens: [next[$0]]) }, into: logits)
                for i in 0..<n { next[i] = LogitComparison.argmax(logits[i * vocab..<(i + 1) * vocab]) }
            }
            decodeRates.append(Double(n * decodeTokens) / (ProgressReporter.monotonicSeconds() - prompted))
            experts.append(Double(session.expertsChosen) / Double(max(1, session.stepsRun)))
        }
        func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
        let perStep = median(experts)
        return ParallelRun(
            sequences: n, prompt: median(promptRates), decode: median(decodeRates), firstToken: median(firstTokens),
            expertsPerStep: perStep,
            bytesPerStep: Double(session.model.denseBytesPerStep) + perStep * Double(session.model.meanExpertBytes))
    }

    private func report(_ runs: [ParallelRun], session: Session) {
        if json {
            let items: [JSONValue] = runs.map { r in
                .object(
                    JSONObject([
                        ("sequences", .int(r.sequences)),
                        ("aggregate_prompt_tokens_per_second", .double(r.prompt)),
                        ("aggregate_decode_tokens_per_second", .double(r.decode)),
                        ("sequence_decode_tokens_per_second", .double(r.decode / Double(r.sequences))),
                        ("prompts_seconds", .double(r.firstToken)),
                        ("experts_per_decode_step", .double(r.expertsPerStep)),
                        ("weight_bytes_per_decode_step", .double(r.bytesPerStep)),
                        ("weight_bytes_per_decoded_token", .double(r.bytesPerStep / Double(r.sequences)))
                    ]))
            }
            print(
                JSONWriter.serialize(
                    .object(
                        JSONObject([
                            ("package", .string(package)), ("threads", .int(session.threads)),
                            ("kernels", .string(session.kernels.name)), ("kernels_forced", .bool(DotKernels.forcedByEnvironment)),
                            ("cpu", DotKernels.cpuModel.map { .string($0) } ?? .null),
                            ("prompt_tokens", .int(promptTokens)), ("decode_tokens", .int(decodeTokens)),
                            ("repetitions", .int(repetitions)), ("context", .int(session.contextLength)),
                            ("memory_budget_bytes", runtime.memoryBudget.map { .int($0.bytes) } ?? .null),
                            ("dense_bytes_per_step", .int(session.model.denseBytesPerStep)),
                            ("mean_expert_bytes", .int(session.model.meanExpertBytes)),
                            ("peak_rss_bytes", .int(peakResidentBytes())),
                            ("runs", .array(items))
                        ])), pretty: true))
            return
        }
        print(
            """
            \(package): \(session.threads) threads, median of \(repetitions); each sequence \(promptTokens) prompt + \(decodeTokens) decoded tokens
            kernels: \(DotKernels.describe(session.kernels))
            weights read per decode step: \(PackageSummary.bytes(session.model.denseBytesPerStep)) dense, plus \(PackageSummary.bytes(session.model.meanExpertBytes)) per chosen expert
            """)
        print("sequences  prompt tok/s  decode tok/s  per sequence  experts/step  weights/step  weights/token")
        for r in runs {
            let cells = [
                String(r.sequences), String(format2: r.prompt), String(format2: r.decode), String(format2: r.decode / Double(r.sequences)),
                String(format2: r.expertsPerStep), PackageSummary.bytes(Int(r.bytesPerStep)),
                PackageSummary.bytes(Int(r.bytesPerStep / Double(r.sequences)))
            ]
            let widths = [9, 13, 13, 13, 13, 13, 14]
            print(zip(cells, widths).map { String(repeating: " ", count: max(0, $1 - $0.count)) + $0 }.joined(separator: " "))
        }
        print("peak RSS: \(PackageSummary.bytes(peakResidentBytes()))")
    }
}
