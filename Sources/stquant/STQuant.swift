import ArgumentParser
import Format

@main
struct STQuant: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stquant",
        abstract: "Quantise a .stpk package to Q4_0 or Q8_0 (ggml-compatible blocks).",
        version: PackageFormat.converterVersion
    )

    func run() throws {
        throw ValidationError("not implemented yet")
    }
}
