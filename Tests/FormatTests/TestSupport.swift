import Foundation
@testable import Format

/// Paths and small helpers shared by the Format tests.
enum Fixtures {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures").path
    static let models = ["tiny-4b-like", "tiny-21b-like", "tiny-untied"]
    static func model(_ name: String) -> String { root + "/smallthinker-tiny/" + name }
}

/// A scratch directory removed when the value is dropped.
final class ScratchDirectory {
    let path: String

    init() {
        path = NSTemporaryDirectory() + "stpk-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    func file(_ name: String) -> String { path + "/" + name }

    /// Copies a fixture checkpoint folder into `name` and returns its path.
    func copyModel(_ model: String, as name: String = "checkpoint") -> String {
        let destination = file(name)
        try! FileManager.default.copyItem(atPath: Fixtures.model(model), toPath: destination)
        for item in try! FileManager.default.contentsOfDirectory(atPath: destination) {
            try! FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: destination + "/" + item)
        }
        return destination
    }

    var entries: [String] { (try? FileManager.default.contentsOfDirectory(atPath: path))?.sorted() ?? [] }
}

/// An independent safetensors reader/writer for tests (Foundation JSON, not our parser), so that
/// a bug in `SafetensorsFile` cannot hide itself.
struct RawSafetensors {
    var header: [String: Any]
    var data: Data

    init(path: String) throws {
        let bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        let length = bytes.prefix(8).withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self))) }
        header = try JSONSerialization.jsonObject(with: bytes.subdata(in: 8..<8 + length)) as! [String: Any]
        data = bytes.subdata(in: 8 + length..<bytes.count)
    }

    var tensorNames: [String] { header.keys.filter { $0 != "__metadata__" }.sorted() }

    func entry(_ name: String) -> (dtype: String, shape: [Int], range: Range<Int>) {
        let e = header[name] as! [String: Any]
        let offsets = e["data_offsets"] as! [Int]
        return (e["dtype"] as! String, e["shape"] as! [Int], offsets[0]..<offsets[1])
    }

    func bytes(_ name: String) -> Data { data.subdata(in: entry(name).range) }

    /// Float values of a tensor, upcast to Float.
    func floats(_ name: String) -> [Float] {
        let e = entry(name)
        let raw = bytes(name)
        switch e.dtype {
        case "BF16": return raw.withUnsafeBytes { p in (0..<raw.count / 2).map { Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self)) << 16) } }
        case "F16": return raw.withUnsafeBytes { p in (0..<raw.count / 2).map { Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self))) } }
        default: return raw.withUnsafeBytes { p in (0..<raw.count / 4).map { p.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) } }
        }
    }

    static func write(headerText: String, data: Data, to path: String) throws {
        var headerBytes = Data(headerText.utf8)
        var out = Data()
        withUnsafeBytes(of: UInt64(headerBytes.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(headerBytes)
        out.append(data)
        headerBytes.removeAll()
        try out.write(to: URL(fileURLWithPath: path))
    }

    func write(to path: String) throws {
        let text = String(data: try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys]), encoding: .utf8)!
        try RawSafetensors.write(headerText: text, data: data, to: path)
    }
}

extension FormatError {
    var safetensorsDefect: SafetensorsDefect? { if case .malformedSafetensors(_, let d, _) = self { d } else { nil } }
    var checkpointDefect: CheckpointDefect? { if case .invalidCheckpoint(_, let d, _) = self { d } else { nil } }
    var packageDefect: PackageDefect? { if case .malformedPackage(_, let d, _) = self { d } else { nil } }
}

/// Converts a fixture with default options into `scratch` and returns the package path.
func convertFixture(_ model: String, in scratch: ScratchDirectory, dtype: TensorDType? = nil) throws -> String {
    let output = scratch.file("\(model)-\(dtype?.rawValue ?? "source").stpk")
    let plan = try Converter.plan(checkpoint: try Checkpoint(directory: Fixtures.model(model)), dtype: dtype)
    try Converter.write(plan, to: output, overwrite: false)
    return output
}
