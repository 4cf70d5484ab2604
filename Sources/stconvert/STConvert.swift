import ArgumentParser
import Format

#if canImport(Glibc)
import Glibc
#endif

extension TensorDType: ExpressibleByArgument {
    public init?(argument: String) { self.init(rawValue: argument.lowercased()) }
}

@main
struct STConvert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stconvert",
        abstract: "Convert a Hugging Face SmallThinker checkpoint into a .stpk package.",
        discussion: """
            Reads config.json and model.safetensors (or model-*-of-*.safetensors with \
            model.safetensors.index.json), checks every tensor against the config, and writes one \
            package file: dense tensors first, then one 4096-byte-aligned bundle per expert \
            (gate, up, down, all neuron-major), then the tokenizer and generation config files.
            """,
        version: PackageFormat.converterVersion
    )

    @Argument(help: "The Hugging Face checkpoint folder.")
    var checkpoint: String

    @Option(name: .shortAndLong, help: "The package file to write.")
    var output: String?

    @Option(help: "Stored dtype of every tensor: f32, f16 or bf16 (default: keep the source dtype, lossless).")
    var dtype: TensorDType?

    @Option(help: "Take tokenizer.json and tokenizer_config.json from this folder instead of the checkpoint.")
    var tokenizer: String?

    @Flag(help: "Overwrite the output if it exists.")
    var force = false

    @Flag(name: .shortAndLong, help: "Print nothing but errors.")
    var quiet = false

    @Flag(help: "Print the plan (tensors, layout, output size) and write nothing.")
    var dryRun = false

    func validate() throws {
        if let dtype, dtype.isQuantized {
            throw ValidationError("--dtype must be f32, f16 or bf16 (got '\(dtype.rawValue)'); quantise with stquant")
        }
        if output == nil && !dryRun {
            throw ValidationError("missing -o/--output: the package file to write")
        }
    }

    func run() throws {
        try reportingErrors(tool: "stconvert", exit: { ExitCode($0) }) {
            let source = try Checkpoint(directory: checkpoint, tokenizerDirectory: tokenizer)
            let plan = try Converter.plan(checkpoint: source, dtype: dtype)
            if dryRun {
                print(PackageSummary.text(plan.manifest, dataOffset: plan.dataOffset, fileLength: plan.outputSize, listTensors: true))
                print("\nwould write \(plan.outputSize) bytes\(output.map { " to \($0)" } ?? ""); nothing written (--dry-run)")
                return
            }
            let output = output!
            var meter = ProgressReporter(enabled: !quiet && isatty(STDERR_FILENO) != 0, sink: writeStandardError)
            try Converter.write(plan, to: output, overwrite: force) { progress in
                let layer = progress.layer.map { "experts of layer \($0 + 1)/\(plan.manifest.config.layerCount)" } ?? "dense tensors"
                meter.update(done: progress.bytesWritten, total: progress.totalBytes, label: layer)
            }
            meter.finish()
            if !quiet {
                print(
                    "wrote \(output): \(PackageSummary.bytes(plan.outputSize)), \(plan.manifest.tensors.count) tensors, "
                        + "\(plan.manifest.bundles.count) expert bundles in \(meter.elapsedText)"
                )
            }
        }
    }
}
