/// Writes a GGUF file (version 3): metadata in the given order, then the tensor infos, then each
/// tensor's data at a multiple of `alignment`, written to a temporary file beside the
/// destination and renamed into place when complete.
public final class GGUFWriter {
    /// One tensor to write: ggml dimensions (fastest first), type, and its bytes, produced in
    /// order by `write` (it must append exactly `length` bytes).
    public struct Tensor {
        public let name: String
        public let dimensions: [Int]
        public let type: GGMLType
        public let write: (inout GGUFSink) throws(FormatError) -> Void

        public init(name: String, dimensions: [Int], type: GGMLType, write: @escaping (inout GGUFSink) throws(FormatError) -> Void) {
            self.name = name
            self.dimensions = dimensions
            self.type = type
            self.write = write
        }

        public var length: Int { dimensions.reduce(1, *) / type.blockSize * type.blockBytes }
    }

    /// Writes `metadata` (`general.alignment` among them when not 32) and `tensors` to `destination`.
    public static func write(
        metadata: [(String, GGUFValue)], tensors: [Tensor], alignment: Int, to destination: String, overwrite: Bool,
        progress: (Int, Int) -> Void = { _, _ in }
    ) throws(FormatError) {
        if FileSystem.exists(destination) && !overwrite { throw .outputExists(path: destination) }
        var header: [UInt8] = GGUFFile.magic
        append(UInt32(3), to: &header)
        append(UInt64(tensors.count), to: &header)
        append(UInt64(metadata.count), to: &header)
        for (key, value) in metadata {
            append(string: key, to: &header)
            append(value, to: &header, typed: true)
        }
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            precondition(t.dimensions.first.map { $0 % t.type.blockSize == 0 } ?? false, "\(t.name): rows are not whole blocks")
            append(string: t.name, to: &header)
            append(UInt32(t.dimensions.count), to: &header)
            for d in t.dimensions { append(UInt64(d), to: &header) }
            append(t.type.rawValue, to: &header)
            append(UInt64(offset), to: &header)
            offsets.append(offset)
            offset += (t.length + alignment - 1) / alignment * alignment
        }
        let dataStart = (header.count + alignment - 1) / alignment * alignment
        header += [UInt8](repeating: 0, count: dataStart - header.count)
        let temporary = FileSystem.temporaryPath(beside: destination)
        let file = try SystemFile.createExclusive(temporary, becoming: destination)
        var done = false
        defer { if !done { FileSystem.remove(temporary) } }
        try GGUFWriter.write(header, to: file, at: 0)
        let total = dataStart + offset
        for (t, start) in zip(tensors, offsets) {
            var sink = GGUFSink(file: file, position: dataStart + start, name: t.name, expected: t.length)
            try t.write(&sink)
            try sink.finish()
            progress(dataStart + start + t.length, total)
        }
        try file.truncate(to: total)
        try file.synchronize()
        try FileSystem.rename(temporary, to: destination)
        done = true
    }

    static func write(_ bytes: [UInt8], to file: SystemFile, at offset: Int) throws(FormatError) {
        let result: Result<Void, FormatError> = bytes.withUnsafeBytes { raw in
            Result { () throws(FormatError) in try file.write(raw, at: offset) }
        }
        try result.get()
    }

    static func append<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out += $0 }
    }

    static func append(string: String, to out: inout [UInt8]) {
        append(UInt64(string.utf8.count), to: &out)
        out += string.utf8
    }

    static func typeCode(_ v: GGUFValue) -> UInt32 {
        switch v {
        case .uint8: 0
        case .int8: 1
        case .uint16: 2
        case .int16: 3
        case .uint32: 4
        case .int32: 5
        case .float32: 6
        case .bool: 7
        case .string: 8
        case .array: 9
        case .uint64: 10
        case .int64: 11
        case .float64: 12
        }
    }

    static func append(_ v: GGUFValue, to out: inout [UInt8], typed: Bool) {
        if typed { append(typeCode(v), to: &out) }
        switch v {
        case .uint8(let x): append(x, to: &out)
        case .int8(let x): append(x, to: &out)
        case .uint16(let x): append(x, to: &out)
        case .int16(let x): append(x, to: &out)
        case .uint32(let x): append(x, to: &out)
        case .int32(let x): append(x, to: &out)
        case .uint64(let x): append(x, to: &out)
        case .int64(let x): append(x, to: &out)
        case .float32(let x): append(x.bitPattern, to: &out)
        case .float64(let x): append(x.bitPattern, to: &out)
        case .bool(let x): out.append(x ? 1 : 0)
        case .string(let s): append(string: s, to: &out)
        case .array(let element, let items):
            append(element, to: &out)
            append(UInt64(items.count), to: &out)
            for item in items { append(item, to: &out, typed: false) }
        }
    }
}

/// Where a tensor's bytes go, buffered, with a check that exactly its length arrives.
public struct GGUFSink {
    let file: SystemFile
    var position: Int
    let name: String
    let expected: Int
    private(set) var written = 0
    private var buffer: [UInt8] = []

    init(file: SystemFile, position: Int, name: String, expected: Int) {
        self.file = file
        self.position = position
        self.name = name
        self.expected = expected
    }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) throws(FormatError) {
        precondition(written + bytes.count <= expected, "tensor \(name): more bytes than its length \(expected)")
        buffer += bytes
        written += bytes.count
        if buffer.count >= 4 << 20 { try flush() }
    }

    mutating func flush() throws(FormatError) {
        try GGUFWriter.write(buffer, to: file, at: position)
        position += buffer.count
        buffer.removeAll(keepingCapacity: true)
    }

    mutating func finish() throws(FormatError) {
        precondition(written == expected, "tensor \(name): \(written) bytes written, \(expected) planned")
        try flush()
    }
}
