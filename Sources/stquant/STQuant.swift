import ArgumentParser
import Format

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension TensorDType: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument.lowercased()) }
}

@main
struct STQuant: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stquant",
        abstract: "Quantise a .stpk package to Q4_0 or Q8_0 (ggml-compatible blocks).",
        discussion: """
            Default policy: every 2-D weight whose rows split into blocks of 32 becomes --type \
            (embeddings and output head included); norms and routers stay f32; a matrix whose rows \
            cannot be split falls back to f16. The expert bundles keep their layout: contiguous per \
            layer, 4096-byte aligned, gate/up/down neuron-major.
            """,
        version: PackageFormat.converterVersion
    )

    @Argument(help: "The float package to quantise.")
    var input: String

    @Option(name: .shortAndLong, help: "The package file to write.")
    var output: String?

    @Option(help: "q4_0 or q8_0.")
    var type: TensorDType

    @Option(help: "Type for the token embeddings (e.g. q8_0, f16, f32).")
    var embeddingType: TensorDType?

    @Option(help: "Type for the untied output head.")
    var outputType: TensorDType?

    @Option(
        name: .customLong("tensor-type"),
        help: ArgumentHelp(
            "Type for tensors whose name matches PATTERN (* matches anything), e.g. 'layers.*.attn_v=q8_0'. Repeatable; the first match "
                + "wins.",
            valueName: "PATTERN=TYPE"))
    var tensorTypes: [String] = []

    @Option(
        help: ArgumentHelp(
            "An importance matrix (strun imatrix, or llama-imatrix on our GGUF export): Q4_0 blocks chosen by error weighted by it, "
                + "as llama-quantize --imatrix chooses them.", valueName: "FILE"))
    var imatrix: String?

    @Flag(
        help: ArgumentHelp(
            "Choose the Q4_0 token embedding's blocks with error feedback (GPTQ's order of work, ggml's blocks) that keeps their "
                + "rounding error out of the directions the routers read: every router reads the raw residual stream the embedding "
                + "starts. Needs no calibration text; with --imatrix for the rest it took the trained fixture's mean KL from "
                + "0.0335 to 0.022 (plain Q4_0: 0.040). Not what llama-quantize writes."))
    var routerAware = false

    @Flag(help: "Allow re-quantising tensors that are already quantised to another type.")
    var allowRequantize = false

    @Flag(
        help: ArgumentHelp(
            "Store Q4_0 matrices in ggml's plain row order instead of row_major_x8 groups of eight rows and, for expert up matrices, "
                + "row_major_b8 groups of eight blocks (slower to run; for tools that read rows in place).")
    )
    var plainRows = false

    @Option(name: [.customShort("t"), .long], help: "Worker threads (default: all cores).")
    var threads: Int?

    @Flag(help: "Overwrite the output if it exists.")
    var force = false

    @Flag(name: .shortAndLong, help: "Print nothing but errors.")
    var quiet = false

    @Flag(help: "Print the per-tensor plan and write nothing.")
    var dryRun = false

    @Flag(help: "Print the report as JSON.")
    var json = false

    func validate() throws {
        guard type.isQuantized else {
            throw ValidationError("--type must be q4_0 or q8_0 (got '\(type.rawValue)'); stconvert --dtype writes float types")
        }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
        if output == nil && !dryRun { throw ValidationError("missing -o/--output: the package file to write") }
    }

    func run() throws {
        try reportingErrors(tool: "stquant", exit: { ExitCode($0) }) {
            var overrides: [(pattern: String, type: TensorDType)] = []
            for text in tensorTypes { overrides.append(try QuantizationPolicy.parseOverride(text)) }
            var policy = QuantizationPolicy(
                type: type, embeddingType: embeddingType, outputType: outputType,
                overrides: overrides, allowRequantize: allowRequantize, groupedLayouts: !plainRows)
            if let imatrix { policy.importance = try ImportanceMatrix(path: imatrix) }
            policy.routerAware = routerAware
            let source = try PackageReader(path: input)
            let plan = try Quantizer.plan(source: source, policy: policy)
            let fallbacks = plan.manifest.tensors.filter { plan.decisions[$0.name]!.fellBack }
            if dryRun {
                print(QuantizationSummary.plan(plan))
                return
            }
            if !quiet && !json, imatrix != nil {
                writeStandardError(
                    "stquant: importance matrix: \(plan.importance.count) tensors weighted"
                        + (plan.unweighted.isEmpty
                            ? ""
                            : ", \(plan.unweighted.count) with nothing in it quantised plainly ("
                                + plan.unweighted.prefix(4).joined(separator: ", ") + (plan.unweighted.count > 4 ? ", …" : "") + ")") + "\n"
                )
            }
            if !quiet && !json, !plan.compensation.isEmpty {
                writeStandardError(
                    "stquant: router-aware: \(plan.compensation.keys.sorted().joined(separator: ", ")) with error feedback against the "
                        + "\(source.manifest.config.layerCount) routers\n")
            }
            if !quiet && !json, !fallbacks.isEmpty {
                writeStandardError(
                    "stquant: note: \(fallbacks.count) tensors cannot use \(policy.type.rawValue) and stay f16: "
                        + "\(QuantizationSummary.fallbackText(plan))\n"
                )
            }
            let output = output!
            var meter = ProgressReporter(enabled: !quiet && isatty(STDERR_FILENO) != 0, sink: writeStandardError)
            let report = try Quantizer.write(
                plan, to: output, overwrite: force,
                threads: threads ?? Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
            ) { progress in
                meter.update(
                    done: progress.bytesWritten, total: progress.totalBytes, label: progress.label(layers: plan.manifest.config.layerCount))
            }
            meter.finish()
            if json {
                print(JSONWriter.serialize(QuantizationSummary.json(report, output: output, type: policy.type), pretty: true))
            } else if !quiet {
                print(QuantizationSummary.text(report, input: input, output: output, type: policy.type))
            }
        }
    }
}
