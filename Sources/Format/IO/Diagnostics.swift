/// An error whose description is a complete message for the user (what went wrong, where, what
/// to do): the libraries' error enums. The tools print these; anything else is a bug or a
/// command-line error of the argument parser's own.
public protocol ReportableError: Error, CustomStringConvertible {}

extension FormatError: ReportableError {}

/// The one way the three command-line tools report a library error: `TOOL: error: MESSAGE` on
/// one line on stderr, then the error `exit(1)` makes is thrown (ArgumentParser's `ExitCode`, so
/// the tool exits with status 1). Errors that are not `ReportableError` pass through unchanged.
public func reportingErrors(tool: String, exit: (Int32) -> any Error, _ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as any ReportableError {
        writeStandardError("\(tool): error: \(error)\n")
        throw exit(1)
    }
}
