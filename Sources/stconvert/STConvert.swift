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
struct STConvert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stconvert",
        abstract: "Convert a SmallThinker model: Hugging Face checkpoint or GGUF to .stpk, or .stpk to GGUF.",
        discussion: """
            A checkpoint folder: reads config.json and model.safetensors (or model-*-of-*.safetensors \
            with model.safetensors.index.json), checks every tensor against the config, and writes one \
            package file: dense tensors first, then one 4096-byte-aligned bundle per expert \
            (gate, up, down, all neuron-major), then the tokenizer and generation config files.

            A .gguf file (llama.cpp's smallthinker architecture): imported into a package. f32, \
            f16, bf16, q8_0 and q4_0 blocks are copied where the orientation allows (the expert \
            down matrices, hidden-major in GGUF, are requantised when quantised); the other types \
            llama-quantize's presets write (q4_1, q5_0, q5_1, q2_K-q6_K, iq4_nl, iq4_xs) are \
            decoded as ggml decodes them and stored as --type, by default q4_0 for those of 4.5 \
            bits a value or fewer and q8_0 for wider ones. What was converted and what it cost is \
            printed, and recorded in the package's provenance.

            A .stpk package with -o NAME.gguf: exported for llama.cpp (its names, shapes and \
            metadata, tensors aligned to 4096 bytes); --dtype q4_0 or q8_0 quantises as \
            `llama-quantize --pure` would (norms and routers stay f32).
            """,
        version: PackageFormat.converterVersion
    )

    @Argument(help: "The Hugging Face checkpoint folder, a .gguf file, or a .stpk package to export.")
    var checkpoint: String

    @Option(name: .shortAndLong, help: "The file to write: a .stpk package, or a .gguf when the input is a package.")
    var output: String?

    @Option(
        help: ArgumentHelp(
            "Stored dtype of every tensor: f32, f16 or bf16 (default: keep the source dtype, lossless); exporting to GGUF, also "
                + "q4_0 or q8_0."))
    var dtype: TensorDType?

    @Option(
        help: ArgumentHelp(
            "Converting a checkpoint: quantise on the way to q4_0 or q8_0, as stconvert then stquant would, with no float "
                + "package in between (stquant's policy; --embedding-type, --output-type and --tensor-type as in stquant). "
                + "Importing a GGUF: store every weight matrix as this type (q4_0, q8_0, f16, bf16 or f32)."))
    var type: TensorDType?

    @Option(
        help: ArgumentHelp(
            "Converting a checkpoint with --type q4_0, or importing a GGUF whose blocks are re-encoded as q4_0: Q4_0 blocks chosen "
                + "by error weighted by this importance matrix, as stquant --imatrix.", valueName: "FILE"))
    var imatrix: String?

    @Flag(help: "Converting a checkpoint with --type q4_0: the token embedding's blocks chosen as stquant --router-aware chooses them.")
    var routerAware = false

    @Option(help: "With --type: type for the token embeddings.")
    var embeddingType: TensorDType?

    @Option(help: "With --type: type for the untied output head.")
    var outputType: TensorDType?

    @Option(
        name: .customLong("tensor-type"),
        help: ArgumentHelp("With --type: PATTERN=TYPE, as in stquant (repeatable).", valueName: "PATTERN=TYPE"))
    var tensorTypes: [String] = []

    @Option(
        help: ArgumentHelp(
            "Exporting to GGUF: align tensor data to this many bytes (a power of two, at least 32; default 4096, a page). "
                + "llama-quantize rewrites files at 32 but keeps the general.alignment key it read, so give it a file made with 32."))
    var alignment: Int = 4096

    @Flag(help: "Export to GGUF even when llama.cpp's port cannot represent the model's per-layer layouts (it will compute another model).")
    var forceLayout = false

    @Option(help: "Take tokenizer.json and tokenizer_config.json from this folder instead of the checkpoint.")
    var tokenizer: String?

    @Flag(help: "Overwrite the output if it exists.")
    var force = false

    @Flag(name: .shortAndLong, help: "Print nothing but errors.")
    var quiet = false

    @Flag(help: "Print the plan (tensors, layout, output size) and write nothing.")
    var dryRun = false

    /// What the input is.
    enum Input { case checkpoint, gguf, package }

    var input: Input {
        guard !FileSystem.isDirectory(checkpoint), let head = try? FileSystem.readPrefix(checkpoint, count: 4) else { return .checkpoint }
        if head == GGUFFile.magic { return .gguf }
        if head == Array(PackageFormat.magic.prefix(4)) { return .package }
        return checkpoint.hasSuffix(".gguf") ? .gguf : .checkpoint
    }

    func validate() throws {
        let input = self.input  // reads the file's first bytes once
        if output == nil && !dryRun {
            throw ValidationError("missing -o/--output: the file to write")
        }
        if imatrix != nil, let type, type != .q4_0 { throw ValidationError("--imatrix weighs q4_0 blocks: it goes with --type q4_0") }
        if routerAware && input != .checkpoint {
            throw ValidationError(
                "--router-aware goes with converting a checkpoint (--type q4_0); for a package use stquant --router-aware")
        }
        switch input {
        case .package:
            guard dryRun || output!.hasSuffix(".gguf") else {
                throw ValidationError(
                    "the input is a .stpk package: give -o NAME.gguf to export it (stquant converts packages between types)")
            }
            if imatrix != nil {
                throw ValidationError("--imatrix does not apply to an export: quantise the package with stquant --imatrix")
            }
        case .gguf:
            if dtype != nil { throw ValidationError("--dtype does not apply to a GGUF import: --type sets the stored type") }
            if embeddingType != nil || outputType != nil || !tensorTypes.isEmpty {
                throw ValidationError("--embedding-type, --output-type and --tensor-type go with --type converting a checkpoint")
            }
            if tokenizer != nil { throw ValidationError("--tokenizer does not apply to a GGUF import: the tokenizer comes from the file") }
        case .checkpoint:
            if let type {
                guard type.isQuantized else {
                    throw ValidationError("--type must be q4_0 or q8_0 (got '\(type.rawValue)'); --dtype writes float types")
                }
                if dtype != nil { throw ValidationError("--type quantises from the checkpoint's own dtype; leave out --dtype") }
            } else if embeddingType != nil || outputType != nil || !tensorTypes.isEmpty || imatrix != nil || routerAware {
                throw ValidationError("--embedding-type, --output-type, --tensor-type, --imatrix and --router-aware go with --type")
            }
            if let dtype, dtype.isQuantized {
                throw ValidationError("--dtype must be f32, f16 or bf16 (got '\(dtype.rawValue)'); quantise with stquant")
            }
        }
        if forceLayout && input != .package { throw ValidationError("--force-layout applies to exporting a package to GGUF") }
        if alignment < 32 || alignment & (alignment - 1) != 0 || alignment > 1 << 16 {
            throw ValidationError("--alignment must be a power of two from 32 to 65536 (got \(alignment))")
        }
        if alignment != 4096 && input != .package { throw ValidationError("--alignment applies to exporting a package to GGUF") }
    }

    func run() throws {
        try reportingErrors(tool: "stconvert", exit: { ExitCode($0) }) {
            switch input {
            case .gguf: return try importGGUF()
            case .package: return try exportGGUF()
            case .checkpoint: break
            }
            let source = try Checkpoint(directory: checkpoint, tokenizerDirectory: tokenizer)
            let plan = try Converter.plan(checkpoint: source, dtype: dtype)
            if type != nil { return try convertAndQuantize(plan) }
            if dryRun {
                print(PackageSummary.text(plan.manifest, dataOffset: plan.dataOffset, fileLength: plan.outputSize, listTensors: true))
                print("\nwould write \(plan.outputSize) bytes\(output.map { " to \($0)" } ?? ""); nothing written (--dry-run)")
                return
            }
            let output = output!
            var meter = ProgressReporter(enabled: !quiet && isatty(STDERR_FILENO) != 0, sink: writeStandardError)
            try Converter.write(plan, to: output, overwrite: force) { progress in
                meter.update(
                    done: progress.bytesWritten, total: progress.totalBytes, label: progress.label(layers: plan.manifest.config.layerCount))
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

    func importGGUF() throws {
        var plan = try GGUFImport.plan(try GGUFFile(path: checkpoint), type: type)
        if let imatrix { plan.importance = try ImportanceMatrix(path: imatrix) }
        let conversions = plan.conversions.sorted { $0.key.description < $1.key.description }
        if dryRun {
            print(PackageSummary.text(plan.manifest, dataOffset: plan.dataOffset, fileLength: plan.outputSize, listTensors: true))
            for note in plan.notes { print("note: \(note)") }
            for (c, n) in conversions { print("would convert \(n) GGUF tensor\(n == 1 ? "" : "s") \(c)") }
            print("\nwould write \(plan.outputSize) bytes\(output.map { " to \($0)" } ?? ""); nothing written (--dry-run)")
            return
        }
        let output = output!
        var meter = ProgressReporter(enabled: !quiet && isatty(STDERR_FILENO) != 0, sink: writeStandardError)
        let summary = try GGUFImport.write(plan, to: output, overwrite: force) { progress in
            meter.update(
                done: progress.bytesWritten, total: progress.totalBytes, label: progress.label(layers: plan.manifest.config.layerCount))
        }
        meter.finish()
        if !quiet {
            for note in plan.notes { writeStandardError("stconvert: note: \(note)\n") }
            for (c, n) in conversions {
                let e = summary.errors[c] ?? QuantizationError()
                print(
                    "converted \(n) GGUF tensor\(n == 1 ? "" : "s") \(c): relative RMS error "
                        + "\(QuantizationSummary.scientific(e.relativeRMSE)), largest \(QuantizationSummary.scientific(Double(e.maxAbsoluteError)))"
                )
            }
            print(
                "wrote \(output) from GGUF: \(PackageSummary.bytes(plan.outputSize)), \(plan.manifest.tensors.count) tensors, "
                    + "\(plan.manifest.bundles.count) expert bundles in \(meter.elapsedText)")
        }
    }

    func exportGGUF() throws {
        let package = try PackageReader(path: checkpoint)
        let plan = try GGUFExport.plan(package: package, dtype: dtype, forceLayout: forceLayout, alignment: alignment)
        if dryRun {
            for t in plan.tensors { print("\(t.name)  \(t.type)  \(t.dimensions)") }
            for note in plan.notes { print("note: \(note)") }
            print("\nwould write \(plan.tensors.count) tensors\(output.map { " to \($0)" } ?? ""); nothing written (--dry-run)")
            return
        }
        let output = output!
        var meter = ProgressReporter(enabled: !quiet && isatty(STDERR_FILENO) != 0, sink: writeStandardError)
        try GGUFExport.write(plan, to: output, overwrite: force) { done, total in meter.update(done: done, total: total, label: "tensors") }
        meter.finish()
        if !quiet {
            for note in plan.notes { writeStandardError("stconvert: note: \(note)\n") }
            print("wrote \(output): GGUF for llama.cpp, \(plan.tensors.count) tensors in \(meter.elapsedText)")
        }
    }

    /// The checkpoint straight to a quantised package: the quantiser reads the planned conversion.
    func convertAndQuantize(_ conversion: ConversionPlan) throws {
        var overrides: [(pattern: String, type: TensorDType)] = []
        for text in tensorTypes { overrides.append(try QuantizationPolicy.parseOverride(text)) }
        var policy = QuantizationPolicy(type: type!, embeddingType: embeddingType, outputType: outputType, overrides: overrides)
        if let imatrix { policy.importance = try ImportanceMatrix(path: imatrix) }
        policy.routerAware = routerAware
        let plan = try Quantizer.plan(source: try ConversionSource(conversion), policy: policy)
        if dryRun {
            print(QuantizationSummary.plan(plan))
            return
        }
        let output = output!
        var meter = ProgressReporter(enabled: !quiet && isatty(STDERR_FILENO) != 0, sink: writeStandardError)
        let report = try Quantizer.write(plan, to: output, overwrite: force, threads: Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) {
            progress in
            meter.update(
                done: progress.bytesWritten, total: progress.totalBytes, label: progress.label(layers: plan.manifest.config.layerCount))
        }
        meter.finish()
        if !quiet { print(QuantizationSummary.text(report, input: checkpoint, output: output, type: policy.type)) }
    }
}
