import CZlib

/// CRC-32 (ISO-HDLC, the zlib/PNG/gzip polynomial), computed by zlib. Incremental: feed bytes in
/// any chunking and the value is the same.
public struct CRC32: Sendable, Equatable {
    public private(set) var value: UInt32 = 0

    public init() {}

    public mutating func update(_ bytes: UnsafeRawBufferPointer) {
        var remaining = bytes
        while !remaining.isEmpty {
            // zlib takes a 32-bit length; feed at most 1 GiB at a time.
            let chunk = min(remaining.count, 1 << 30)
            let result = CZlib.crc32(uLong(value), remaining.baseAddress!.assumingMemoryBound(to: Bytef.self), uInt(chunk))
            value = UInt32(truncatingIfNeeded: result)
            remaining = UnsafeRawBufferPointer(rebasing: remaining[chunk...])
        }
    }

    public mutating func update(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { update($0) }
    }

    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var crc = CRC32()
        crc.update(bytes)
        return crc.value
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0) }
    }

    /// Eight lower-case hex digits: the fixed-width form stored in manifests.
    public static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 8 - digits.count) + digits
    }

    public static func parseHex(_ text: String) -> UInt32? {
        guard text.utf8.count == 8 else { return nil }
        return UInt32(text, radix: 16)
    }
}
