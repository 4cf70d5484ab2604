import Foundation
import Testing
@testable import Format

struct MappedFileTests {
    /// Large files are mapped at a 2 MiB boundary (so the page cache's huge folios can be mapped
    /// whole), small and empty ones as they are, and every byte reads back.
    @Test(arguments: [0, 100, 4096, (5 << 20) + 123])
    func mapsEveryByteAndAlignsLargeFiles(size: Int) throws {
        let scratch = ScratchDirectory()
        let path = scratch.file("data.bin")
        let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 7) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        let mapped = try MappedFile(path: path)
        #expect(mapped.bytes.count == size)
        #expect(Array(mapped.bytes) == bytes)
        #if os(Linux)
        if size >= 2 << 20 { #expect(UInt(bitPattern: mapped.bytes.baseAddress!) % UInt(2 << 20) == 0) }
        #endif
    }

    @Test func aMissingFileIsAnError() {
        #expect(throws: FormatError.self) { try MappedFile(path: "/nonexistent/stpk-test/file.stpk") }
    }
}
