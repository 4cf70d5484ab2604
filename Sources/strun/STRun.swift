import ArgumentParser
import Engine
import Format

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct STRun: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strun",
        abstract: "Run, inspect and verify SmallThinker .stpk packages.",
        version: "\(PackageFormat.converterVersion)\nkernels: \(DotKernels.configurationReport)",
        subcommands: [
            Inspect.self, Verify.self, Logits.self, Generate.self, Chat.self, Tokenize.self, Detokenize.self, Compare.self, Bench.self,
            Stats.self, Imatrix.self, Serve.self
        ]
    )
}

/// Runs `body`, turning library errors into one line on stderr and exit code 1.
func reportingErrors(_ body: () throws -> Void) throws {
    try Format.reportingErrors(tool: "strun", exit: { ExitCode($0) }, body)
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Summarise a package: config, sizes per section, expert layout.")

    @Argument(help: "The .stpk package.")
    var package: String

    @Flag(help: "Print machine-readable JSON (format_version, config, tensors, expert_bundles, files).")
    var json = false

    @Flag(help: "List every dense tensor and each layer's expert region.")
    var tensors = false

    @Option(help: "Plan memory for contexts of this many tokens (default: the model's limit, at most 4096).")
    var context: Int?

    @Option(name: [.customLong("np", withSingleDash: true), .long], help: "Plan memory for this many sequences at once (strun serve -np).")
    var parallel = 1

    @Option(help: ArgumentHelp("Plan memory for this KV cache type.", valueName: "f32|f16|q8_0"))
    var kvType: KVCacheType = .default

    @Option(name: [.customShort("t"), .long], help: "Plan memory for this many threads (default: all cores).")
    var threads: Int?

    @Option(help: ArgumentHelp("Say what this memory budget leaves for experts and how many sequences fit.", valueName: "BYTES"))
    var memoryBudget: ByteCount?

    func validate() throws {
        if let context, context < 1 { throw ValidationError("--context must be at least 1") }
        if parallel < 1 { throw ValidationError("-np must be at least 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
    }

    func run() throws {
        try reportingErrors {
            let reader = try PackageReader(path: package)
            let model = try Model(package: reader, copyHotMatrices: false, arrangeExperts: false)
            let contextLength = context ?? model.defaultContextLength
            guard contextLength <= model.config.maxPositionEmbeddings else {
                throw EngineError.contextLength(requested: contextLength, maximum: model.config.maxPositionEmbeddings)
            }
            guard kvType.rowBytes(headDim: model.config.headDim) != nil else {
                throw EngineError.kvCacheType(kvType, headDim: model.config.headDim)
            }
            let threads = threads ?? Session.defaultThreads
            if json {
                guard case .object(var object) = reader.manifest.json else { return }
                object["format_version"] = .string("\(reader.header.majorVersion).\(reader.header.minorVersion)")
                object["file_length"] = .int(reader.header.fileLength)
                object["data_offset"] = .int(reader.header.dataOffset)
                let plan = MemoryPlan(model: model, contextLength: contextLength, threads: threads, sequences: parallel, kvType: kvType)
                let one = MemoryPlan(model: model, contextLength: contextLength, threads: threads, sequences: 1, kvType: kvType)
                object["memory_plan"] = .object(
                    JSONObject([
                        ("context", .int(contextLength)), ("sequences", .int(parallel)), ("threads", .int(threads)),
                        ("kv_type", .string(kvType.rawValue)), ("kv_cache_bytes", .int(plan.kvCacheBytes)),
                        ("kv_bytes_per_token", .int(plan.kvBytesPerToken)), ("dense_bytes", .int(plan.denseBytes)),
                        ("buffer_bytes", .int(plan.bufferBytes)), ("process_bytes", .int(MemoryPlan.processAllowance)),
                        ("minimum_memory_budget_bytes", .int(plan.minimumBudget)),
                        ("sequences_fitting_budget", memoryBudget.map { .int(one.sequencesFitting(budget: $0.bytes)) } ?? .null)
                    ]))
                print(JSONWriter.serialize(.object(object), pretty: true))
            } else {
                print(
                    PackageSummary.text(
                        reader.manifest, dataOffset: reader.header.dataOffset,
                        fileLength: reader.header.fileLength, listTensors: tensors,
                        version: (reader.header.majorVersion, reader.header.minorVersion)))
                print(
                    MemoryPlan.report(
                        model: model, contextLength: contextLength, threads: threads, sequences: parallel, kvType: kvType,
                        memoryBudget: memoryBudget?.bytes))
            }
        }
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a package's structure and every checksum.",
        discussion: "Exits 0 when the package is sound; otherwise prints the first bad tensor or bundle with its byte offset and exits 1."
    )

    @Argument(help: "The .stpk package.")
    var package: String

    @Flag(name: .shortAndLong, help: "Print nothing on success.")
    var quiet = false

    func run() throws {
        try reportingErrors {
            let reader = try PackageReader(path: package)
            try reader.verify()
            if !quiet {
                print(
                    "\(package): OK (\(reader.manifest.tensors.count) tensors, \(reader.manifest.bundles.count) expert bundles, "
                        + "\(reader.manifest.files.count) files, \(PackageSummary.bytes(reader.header.fileLength)) checked)"
                )
            }
        }
    }
}
