import Foundation
import Testing
@testable import Format

struct PackageWriterTests {
    /// Buffers far smaller than the package (hundreds of background writes, each overlapping the
    /// filling of the next buffer, at offsets on and off page boundaries) write the same bytes as
    /// the default buffers, and the result verifies.
    @Test(arguments: [4096, 3000, 1 << 20])
    func smallBuffersWriteTheSamePackage(capacity: Int) throws {
        let scratch = ScratchDirectory()
        let original = try convertFixture("tiny-4b-like", in: scratch)
        let source = try PackageReader(path: original)
        let output = scratch.file("rewritten.stpk")
        let writer = try PackageWriter(
            destination: output, manifest: source.manifest, dataOffset: source.header.dataOffset,
            overwrite: false, bufferCapacity: capacity)
        for t in source.manifest.tensors {
            // In uneven pieces, so appends straddle the buffer boundaries.
            let bytes = source.bytes(of: t)
            try writer.writeTensor(t.name) { (sink) throws(FormatError) in
                var at = 0
                while at < bytes.count {
                    let n = min(777, bytes.count - at)
                    try sink.append(UnsafeRawBufferPointer(rebasing: bytes[at..<(at + n)]))
                    at += n
                }
            }
        }
        for f in source.manifest.files { try writer.writeFile(f.name, contents: source.fileContents(f.name)!) }
        try writer.finish()
        #expect(try Data(contentsOf: URL(fileURLWithPath: output)) == Data(contentsOf: URL(fileURLWithPath: original)))
        try PackageReader(path: output).verify()
        #expect(scratch.entries.filter { $0.hasSuffix(".tmp") }.isEmpty)
    }
}
