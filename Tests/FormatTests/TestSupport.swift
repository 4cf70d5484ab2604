import Foundation
import Testing
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
        case "BF16":
            return raw.withUnsafeBytes { p in
                (0..<raw.count / 2).map { Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self)) << 16) }
            }
        case "F16":
            return raw.withUnsafeBytes { p in
                (0..<raw.count / 2).map { Float(Float16(bitPattern: p.loadUnaligned(fromByteOffset: $0 * 2, as: UInt16.self))) }
            }
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

/// The storage-optimised layout (`specs/FORMAT.md`): dense tensors first and 64-byte aligned, then
/// one bundle per expert, layer-major, 4096-aligned and padded, adjacent, each holding gate, up,
/// down back to back, all neuron-major; embedded files after the expert region.
func checkStorageLayout(_ reader: PackageReader, sourceLocation: SourceLocation = #_sourceLocation) {
    let m = reader.manifest
    let c = m.config
    #expect(m.bundles.count == c.layerCount * c.expertCount, sourceLocation: sourceLocation)
    let bundled = Set(m.bundles.flatMap(\.tensors))
    let denseEnd = m.tensors.filter { !bundled.contains($0.name) }.map { $0.offset + $0.length }.max()!
    for t in m.tensors where !bundled.contains(t.name) {
        #expect(t.offset % 64 == 0 && t.offset < m.bundles[0].offset, "\(t.name)", sourceLocation: sourceLocation)
    }
    #expect(m.bundles[0].offset >= denseEnd && m.bundles[0].offset - denseEnd < 4096, sourceLocation: sourceLocation)
    for (i, b) in m.bundles.enumerated() {
        #expect(b.layer == i / c.expertCount && b.expert == i % c.expertCount, sourceLocation: sourceLocation)
        #expect(b.offset % 4096 == 0 && b.length % 4096 == 0, sourceLocation: sourceLocation)
        if i > 0 {
            #expect(b.offset == m.bundles[i - 1].offset + m.bundles[i - 1].length, "bundles are adjacent", sourceLocation: sourceLocation)
        }
        #expect(b.tensors == ["gate", "up", "down"].map { "layers.\(b.layer).experts.\(b.expert).\($0)" }, sourceLocation: sourceLocation)
        let ts = b.tensors.map { m.tensor(named: $0)! }
        #expect(ts[0].offset == b.offset, "the bundle starts with gate", sourceLocation: sourceLocation)
        #expect(ts.allSatisfy { $0.shape == [c.expertFFNSize, c.hiddenSize] }, "all three neuron-major", sourceLocation: sourceLocation)
        #expect(
            ts[2].layout == .transposed && ts[0].layout.orientation == .rowMajor && ts[1].layout.orientation == .rowMajor,
            sourceLocation: sourceLocation)
        for (a, next) in zip(ts, ts.dropFirst()) {
            #expect(
                next.offset >= a.offset + a.length && next.offset - (a.offset + a.length) < 64, "back to back",
                sourceLocation: sourceLocation)
        }
        #expect(b.offset + b.length - (ts[2].offset + ts[2].length) < 4096, "padding less than one page", sourceLocation: sourceLocation)
    }
    let last = m.bundles.last!
    #expect(m.files.allSatisfy { $0.offset >= last.offset + last.length }, sourceLocation: sourceLocation)
}
