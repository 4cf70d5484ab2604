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
            Stats.self, Serve.self
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

    func run() throws {
        try reportingErrors {
            let reader = try PackageReader(path: package)
            if json {
                guard case .object(var object) = reader.manifest.json else { return }
                object["format_version"] = .string("\(reader.header.majorVersion).\(reader.header.minorVersion)")
                object["file_length"] = .int(reader.header.fileLength)
                object["data_offset"] = .int(reader.header.dataOffset)
                print(JSONWriter.serialize(.object(object), pretty: true))
            } else {
                print(
                    PackageSummary.text(
                        reader.manifest, dataOffset: reader.header.dataOffset,
                        fileLength: reader.header.fileLength, listTensors: tensors,
                        version: (reader.header.majorVersion, reader.header.minorVersion)))
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
