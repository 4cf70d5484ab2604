// Shared by every fuzz target: a private scratch directory (in memory when /dev/shm exists) and
// a way to put the input into a file there, since the parsers under test read files; and the
// real Qwen tokenizer for the targets that tokenize.
import Engine
import Format

#if canImport(Glibc)
import Glibc
#endif

enum Scratch {
    static let directory: String = {
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        var template = Array("\(base)/stfuzz-XXXXXX".utf8CString)
        guard let made = mkdtemp(&template) else { fatalError("cannot make a scratch directory under \(base)") }
        return String(cString: made)
    }()

    /// Writes `count` bytes at `data` to `name` in the scratch directory, returning its path.
    static func write(_ data: UnsafePointer<UInt8>?, _ count: Int, to name: String) -> String {
        let path = directory + "/" + name
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { fatalError("cannot write \(path)") }
        var done = 0
        while done < count, let data {
            let n = Glibc.write(fd, data + done, count - done)
            guard n > 0 else { fatalError("cannot write \(path)") }
            done += n
        }
        close(fd)
        return path
    }

    nonisolated(unsafe) private static var sources: [String: [UInt8]] = [:]

    /// Copies a file into the scratch directory (the source read once per process).
    static func copy(_ source: String, to name: String) {
        if sources[source] == nil {
            guard let bytes = try? FileSystem.readAll(source, limit: 1 << 30) else { fatalError("cannot read \(source)") }
            sources[source] = bytes
        }
        _ = sources[source]!.withUnsafeBufferPointer { write($0.baseAddress, $0.count, to: name) }
    }
}

/// Where the checked-in seed material lives (Tests/Fuzz/Seeds), for targets that need a valid
/// base beside the fuzzed part.
let seedDirectory: String = {
    let file = #filePath
    let targets = file[..<file.lastIndex(of: "/")!]
    return targets[..<targets.lastIndex(of: "/")!] + "/Seeds"
}()

/// The Qwen tokenizer of the fixtures, loaded on first use (a target that uses it touches it in
/// LLVMFuzzerInitialize, so that loading is not timed as an input).
let qwen: Tokenizer = {
    let file = #filePath
    let root = file[..<file.range(of: "/Tests/Fuzz/")!.lowerBound]
    do { return try Tokenizer(path: root + "/Tests/Fixtures/qwen-tokenizer/tokenizer.json") } catch { fatalError("\(error)") }
}()
