import ArgumentParser
import Engine
import Format

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct Imatrix: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Collect an importance matrix over calibration text, in llama.cpp's imatrix format.",
        discussion: """
            Per weight matrix, the sum over the calibration tokens of the square of each input column and the \
            token count (per expert over the tokens routed to it; an expert's down matrix sees its ReGLU \
            activations), under the tensor names of our GGUF export: `stquant --imatrix` and \
            `llama-quantize --imatrix` (on the GGUF export) read the file, and strun reads files that \
            llama-imatrix writes. The text is taken in chunks of --chunk tokens, each from an empty context, as \
            llama-imatrix does. Calibrate on text like what the model will see, not on the text you judge it by.
            """
    )

    @Argument(help: "The .stpk package (float or quantised; collect on the one you quantise from).")
    var package: String

    @OptionGroup var input: InputTokens

    @Option(name: .shortAndLong, help: "Where to write the importance matrix (GGUF).")
    var output: String

    @Option(help: "Tokens per chunk, each evaluated from an empty context (default: 512, or the context if shorter).")
    var chunk: Int?

    @Option(help: "Stop after this many chunks (default: the whole text).")
    var chunks: Int?

    @Option(
        name: .customLong("in-file"),
        help: ArgumentHelp("An importance matrix of the same model to add this text's sums to (repeatable).", valueName: "FILE"))
    var inFiles: [String] = []

    @Flag(help: "Overwrite the output if it exists.")
    var force = false

    @Flag(name: .shortAndLong, help: "No progress on stderr.")
    var quiet = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        if !input.given { throw ValidationError("give the calibration text: --file, --text, --tokens or --tokens-file") }
        if let chunk, chunk < 1 { throw ValidationError("--chunk must be at least 1") }
        if let chunks, chunks < 1 { throw ValidationError("--chunks must be at least 1") }
        if let chunk, let context = runtime.context, chunk > context {
            throw ValidationError("--chunk (\(chunk)) is longer than --context (\(context))")
        }
    }

    func run() throws {
        try reportingErrors {
            // Before the text is run, not after.
            if !force && FileSystem.exists(output) { throw FormatError.outputExists(path: output) }
            let model = try runtime.model(package)
            let chunk = chunk ?? min(512, runtime.context ?? model.defaultContextLength)
            let session = try runtime.session(model: model, contextLength: runtime.context ?? chunk)
            var ids = try input.ids(for: model)
            if let chunks, ids.count > chunks * chunk { ids = Array(ids.prefix(chunks * chunk)) }
            var merged = ImportanceMatrix()
            for file in inFiles { try merged.add(ImportanceMatrix(path: file), source: file) }
            let collector = ImportanceCollector(session: session)
            let start = ProgressReporter.monotonicSeconds()
            let terminal = isatty(STDERR_FILENO) != 0
            try collector.feed(ids, chunk: chunk) { done, count in
                guard !quiet else { return }
                let tokens = min(ids.count, done * chunk), seconds = ProgressReporter.monotonicSeconds() - start
                let rate = Double(tokens) / max(seconds, 1e-6)
                let line =
                    "strun imatrix: chunk \(done)/\(count), \(tokens)/\(ids.count) tokens, \(Int(rate)) tokens/s, about "
                    + "\(Int((Double(ids.count - tokens) / rate).rounded(.up))) s left"
                writeStandardError(terminal ? "\r\u{1B}[K" + line + (done == count ? "\n" : "") : line + "\n")
            }
            let dataset = input.file ?? input.tokensFile ?? (input.text != nil ? "--text" : "--tokens")
            var matrix = collector.matrix(datasets: [dataset])
            try matrix.add(merged, source: inFiles.joined(separator: ", "))
            try matrix.write(to: output, overwrite: force)
            print(
                "wrote \(output): \(matrix.entries.count) matrices, \(ids.count) tokens in \(collector.chunksCollected) chunks of "
                    + "\(chunk)"
                    + (inFiles.isEmpty ? "" : ", added to \(inFiles.count) earlier file(s): \(matrix.chunkCount) chunks in all"))
        }
    }
}
