/// Constants and the fixed header of the .stpk container (`specs/FORMAT.md`).
public enum PackageFormat {
    public static let name = "stpk"
    /// "STPK\r\n\u{1A}\n": the line-ending and EOF bytes catch files mangled by text-mode transfers.
    public static let magic: [UInt8] = [0x53, 0x54, 0x50, 0x4B, 0x0D, 0x0A, 0x1A, 0x0A]
    /// 2.0 added the `row_major_x8` layout, 3.0 `row_major_b8`; versions 1 and 2 are still read.
    public static let majorVersion = 3
    public static let minorVersion = 0
    public static let readableMajorVersions = 1...3
    public static let headerLength = 64
    public static let tensorAlignment = 64
    public static let bundleAlignment = 4096
    /// The data region starts on a page boundary.
    public static let dataAlignment = 4096
    public static let maximumManifestLength = 256 << 20
    public static let maximumRank = 4
    public static let maximumDimension = 1 << 31
    public static let maximumTensorCount = 1 << 20
    public static let maximumFileCount = 64
    public static let converterVersion = "0.1.0"

    @inline(__always)
    public static func align(_ value: Int, to alignment: Int) -> Int {
        (value + alignment - 1) / alignment * alignment
    }
}

/// The 64-byte header at offset 0. All integers little-endian.
///
///     0  magic[8]          PackageFormat.magic
///     8  u16 major         readers reject a major version they do not know
///    10  u16 minor         readers accept any minor version of a known major
///    12  u32 flags         0; readers reject unknown bits
///    16  u64 manifest_offset   = 64
///    24  u64 manifest_length   UTF-8 JSON bytes
///    32  u64 data_offset   multiple of 4096, ≥ manifest end; bytes in between are zero
///    40  u64 file_length   the exact size of the file
///    48  u32 manifest_crc32
///    52  u8[8] reserved    zero
///    60  u32 header_crc32  CRC-32 of bytes 0..<60
public struct PackageHeader: Sendable, Equatable {
    public var majorVersion: Int
    public var minorVersion: Int
    public var flags: UInt32
    public var manifestOffset: Int
    public var manifestLength: Int
    public var dataOffset: Int
    public var fileLength: Int
    public var manifestCRC32: UInt32

    public init(manifestLength: Int, dataOffset: Int, fileLength: Int, manifestCRC32: UInt32) {
        majorVersion = PackageFormat.majorVersion
        minorVersion = PackageFormat.minorVersion
        flags = 0
        manifestOffset = PackageFormat.headerLength
        self.manifestLength = manifestLength
        self.dataOffset = dataOffset
        self.fileLength = fileLength
        self.manifestCRC32 = manifestCRC32
    }

    public func encoded() -> [UInt8] {
        var bytes = PackageFormat.magic
        func put<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        put(UInt16(majorVersion))
        put(UInt16(minorVersion))
        put(flags)
        put(UInt64(manifestOffset))
        put(UInt64(manifestLength))
        put(UInt64(dataOffset))
        put(UInt64(fileLength))
        put(manifestCRC32)
        bytes += [UInt8](repeating: 0, count: 8)
        put(CRC32.checksum(bytes))
        precondition(bytes.count == PackageFormat.headerLength)
        return bytes
    }

    /// Decodes and checks a header against the size of the file it came from.
    public init(decoding bytes: [UInt8], fileSize: Int, path: String) throws(FormatError) {
        func defect(_ kind: PackageDefect, _ detail: String) -> FormatError { .malformedPackage(path: path, defect: kind, detail: detail) }
        guard bytes.count >= PackageFormat.headerLength else {
            throw defect(.truncated, "\(fileSize) bytes; a package starts with a \(PackageFormat.headerLength)-byte header")
        }
        guard Array(bytes[0..<8]) == PackageFormat.magic else {
            throw defect(.notAPackage, "the first 8 bytes are not the .stpk magic (was it written by stconvert?)")
        }
        func read<T: FixedWidthInteger>(_ offset: Int, _: T.Type) -> T {
            bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
        }
        let storedCRC = read(60, UInt32.self)
        let actualCRC = CRC32.checksum(Array(bytes[0..<60]))
        guard storedCRC == actualCRC else {
            throw defect(.headerChecksum, "header CRC-32 is \(CRC32.hex(storedCRC)) but bytes 0..<60 give \(CRC32.hex(actualCRC))")
        }
        majorVersion = Int(read(8, UInt16.self))
        minorVersion = Int(read(10, UInt16.self))
        guard PackageFormat.readableMajorVersions.contains(majorVersion) else {
            throw defect(
                .unsupportedVersion,
                "format version \(majorVersion).\(minorVersion); this build reads versions "
                    + "\(PackageFormat.readableMajorVersions.lowerBound).x to \(PackageFormat.majorVersion).x "
                    + "(update the tools or reconvert)"
            )
        }
        flags = read(12, UInt32.self)
        guard flags == 0 else { throw defect(.unsupportedVersion, "unknown header flags 0x\(String(flags, radix: 16)) at byte 12") }
        func size(_ offset: Int, _ name: String) throws(FormatError) -> Int {
            let value = read(offset, UInt64.self)
            guard value <= UInt64(Int.max / 2) else { throw defect(.rangeOutOfBounds, "\(name) \(value) at byte \(offset) is absurd") }
            return Int(value)
        }
        manifestOffset = try size(16, "manifest offset")
        manifestLength = try size(24, "manifest length")
        dataOffset = try size(32, "data offset")
        fileLength = try size(40, "file length")
        manifestCRC32 = read(48, UInt32.self)
        guard fileLength == fileSize else {
            throw defect(.truncated, "the header records \(fileLength) bytes but the file has \(fileSize)")
        }
        guard manifestOffset == PackageFormat.headerLength else {
            throw defect(.rangeOutOfBounds, "manifest offset is \(manifestOffset); expected \(PackageFormat.headerLength)")
        }
        guard manifestLength <= PackageFormat.maximumManifestLength else {
            throw defect(.rangeOutOfBounds, "manifest length \(manifestLength) exceeds the limit \(PackageFormat.maximumManifestLength)")
        }
        guard manifestOffset + manifestLength <= dataOffset, dataOffset <= fileLength, dataOffset % PackageFormat.dataAlignment == 0 else {
            throw defect(
                .rangeOutOfBounds,
                "manifest [\(manifestOffset), \(manifestOffset + manifestLength)) and data offset \(dataOffset) do not fit a file of "
                    + "\(fileLength) bytes with the data on a \(PackageFormat.dataAlignment)-byte boundary"
            )
        }
    }
}
