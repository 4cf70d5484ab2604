import CQuantize
/// A metadata value of a GGUF file (its spec's `gguf_metadata_value_t`).
public enum GGUFValue: Equatable, Sendable {
    case uint8(UInt8), int8(Int8), uint16(UInt16), int16(Int16), uint32(UInt32), int32(Int32)
    case uint64(UInt64), int64(Int64), float32(Float), float64(Double), bool(Bool), string(String)
    /// The element type's code, and the elements.
    case array(UInt32, [GGUFValue])

    /// The value as an integer, for any integer type that holds it.
    public var int: Int? {
        switch self {
        case .uint8(let v): Int(v)
        case .int8(let v): Int(v)
        case .uint16(let v): Int(v)
        case .int16(let v): Int(v)
        case .uint32(let v): Int(v)
        case .int32(let v): Int(v)
        case .uint64(let v): v <= UInt64(Int.max) ? Int(v) : nil
        case .int64(let v): Int(v)
        default: nil
        }
    }

    public var double: Double? {
        switch self {
        case .float32(let v): Double(v)
        case .float64(let v): v
        default: int.map(Double.init)
        }
    }

    public var string: String? { if case .string(let s) = self { s } else { nil } }
    public var bool: Bool? { if case .bool(let b) = self { b } else { nil } }
    public var array: [GGUFValue]? { if case .array(_, let a) = self { a } else { nil } }

    /// The spec's type codes.
    static let typeNames: [UInt32: String] = [
        0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32", 7: "bool", 8: "string",
        9: "array", 10: "uint64", 11: "int64", 12: "float64"
    ]
}

/// The ggml tensor types a GGUF import reads (ggml's `ggml_type` codes): the package's own
/// (f32, f16, bf16, q8_0, q4_0), copied as they are, and the block formats `llama-quantize`'s
/// common presets write, decoded to floats as ggml decodes them (`decode`) and stored as a
/// package type.
public enum GGMLType: UInt32, Sendable, CaseIterable {
    case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8
    case q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, iq4_nl = 20, iq4_xs = 23
    case bf16 = 30

    /// The package type that holds these blocks as they are; nil for a type that is decoded.
    public var packageType: TensorDType? {
        switch self {
        case .f32: .f32
        case .f16: .f16
        case .q4_0: .q4_0
        case .q8_0: .q8_0
        case .bf16: .bf16
        default: nil
        }
    }

    /// ggml's name for the type.
    public var name: String { packageType?.rawValue ?? String(describing: self) }

    /// Values a block holds.
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16: 1
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .iq4_nl: 32
        case .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .iq4_xs: 256
        }
    }

    /// Bytes a block takes (ggml's block structs).
    public var blockBytes: Int {
        switch self {
        case .f32: 4
        case .f16, .bf16: 2
        case .q4_0, .iq4_nl: 18
        case .q4_1: 20
        case .q5_0: 22
        case .q5_1: 24
        case .q8_0: 34
        case .q2_K: 84
        case .q3_K: 110
        case .q4_K: 144
        case .q5_K: 176
        case .q6_K: 210
        case .iq4_xs: 136
        }
    }

    /// Bits a value takes, blocks' scales included.
    public var bitsPerValue: Double { Double(blockBytes * 8) / Double(blockSize) }

    public init(_ dtype: TensorDType) {
        switch dtype {
        case .f32: self = .f32
        case .f16: self = .f16
        case .q4_0: self = .q4_0
        case .q8_0: self = .q8_0
        case .bf16: self = .bf16
        }
    }

    /// Decodes `count` values (whole blocks) of this type as ggml's reference decoding does.
    public func decode(_ blocks: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        precondition(count % blockSize == 0)
        if let type = packageType {
            TensorCodec.decode(blocks, dtype: type, count: count, into: out)
        } else {
            let status = st_ggml_decode(Int32(rawValue), blocks.assumingMemoryBound(to: UInt8.self), Int64(count), out)
            precondition(status == 0, "st_ggml_decode does not take \(name)")
        }
    }
}

/// One tensor of a GGUF file: ggml's dimensions (`dimensions[0]` varies fastest: a matrix of
/// `rows` rows of `columns` values has dimensions [columns, rows]), type and data.
public struct GGUFTensor: Sendable {
    public let name: String
    public let dimensions: [Int]
    public let type: GGMLType
    /// From the start of the file.
    public let offset: Int
    public let length: Int

    public var elementCount: Int { dimensions.reduce(1, *) }
}

/// A GGUF file (version 3, little-endian), memory-mapped and checked: every count, length and
/// offset is checked against the file before it is used, tensors must be aligned, in range and
/// apart. Reading never allocates more than the file's own size can justify.
public final class GGUFFile: @unchecked Sendable {
    public let path: String
    public let mapping: MappedFile
    /// Keys in file order, and their values.
    public let keys: [String]
    public let metadata: [String: GGUFValue]
    public let tensors: [GGUFTensor]
    public let alignment: Int
    /// Where tensor data starts (tensor offsets in the file are relative to it).
    public let dataOffset: Int

    public static let magic: [UInt8] = Array("GGUF".utf8)
    /// Limits on what a file can make the reader allocate or walk.
    public static let limits = (tensors: 1 << 20, keys: 1 << 20, string: 1 << 30, dimensions: 4, depth: 2)

    public init(path: String) throws(FormatError) {
        self.path = path
        mapping = try MappedFile(path: path)
        var reader = Reader(bytes: mapping.bytes, path: path)
        guard mapping.bytes.count >= 4, Array(mapping.bytes[0..<4]) == GGUFFile.magic else {
            throw reader.error(.notGGUF, "the file does not start with 'GGUF'")
        }
        reader.position = 4
        let version = try reader.u32("the version")
        guard version == 3 else {
            throw reader.error(.unsupportedVersion, "GGUF version \(version); this reader takes version 3 (llama.cpp's since 2023)")
        }
        let tensorCount = try reader.count("the tensor count", limit: GGUFFile.limits.tensors, least: 8 + 4 + 8 + 4 + 8)
        let keyCount = try reader.count("the metadata count", limit: GGUFFile.limits.keys, least: 8 + 4 + 1)
        var keys: [String] = [], metadata: [String: GGUFValue] = [:]
        for _ in 0..<keyCount {
            let key = try reader.string("a metadata key")
            let type = try reader.u32("the type of \(key)")
            let value = try reader.value(type: type, of: key, depth: 0)
            guard metadata.updateValue(value, forKey: key) == nil else {
                throw reader.error(.duplicate, "metadata key \(key) appears twice")
            }
            keys.append(key)
        }
        self.keys = keys
        self.metadata = metadata
        var alignment = 32
        if let value = metadata["general.alignment"] {
            guard case .uint32(let a) = value, a > 0, a & (a - 1) == 0, a <= 1 << 16 else {
                throw reader.error(.invalidValue, "general.alignment is \(value); expected a power of two of type uint32")
            }
            alignment = Int(a)
        }
        self.alignment = alignment
        var infos: [(name: String, dimensions: [Int], type: UInt32, offset: UInt64)] = []
        var names = Set<String>()
        for _ in 0..<tensorCount {
            let name = try reader.string("a tensor name")
            guard names.insert(name).inserted else { throw reader.error(.duplicate, "tensor \(name) appears twice") }
            let rank = try reader.u32("the rank of \(name)")
            guard (1...UInt32(GGUFFile.limits.dimensions)).contains(rank) else {
                throw reader.error(.badDimensions, "tensor \(name) has \(rank) dimensions; expected 1 to \(GGUFFile.limits.dimensions)")
            }
            var dimensions: [Int] = []
            var elements = 1
            for _ in 0..<rank {
                let d = try reader.u64("a dimension of \(name)")
                guard d >= 1, d <= UInt64(mapping.bytes.count) * 2 else {
                    throw reader.error(.badDimensions, "tensor \(name) has a dimension of \(d)")
                }
                let (product, overflow) = elements.multipliedReportingOverflow(by: Int(d))
                guard !overflow, product <= mapping.bytes.count * 2 else {
                    throw reader.error(.badDimensions, "tensor \(name) has more elements than the file could hold")
                }
                elements = product
                dimensions.append(Int(d))
            }
            let type = try reader.u32("the type of \(name)")
            let offset = try reader.u64("the offset of \(name)")
            infos.append((name, dimensions, type, offset))
        }
        let start = (reader.position + alignment - 1) / alignment * alignment
        guard start <= mapping.bytes.count else { throw reader.error(.truncated, "the file ends before its tensor data (\(start) bytes)") }
        dataOffset = start
        var tensors: [GGUFTensor] = []
        for info in infos {
            guard let type = GGMLType(rawValue: info.type) else {
                throw reader.error(
                    .unsupportedTensorType,
                    "tensor \(info.name) has ggml type \(info.type); this import reads "
                        + GGMLType.allCases.map(\.name).joined(separator: ", "))
            }
            guard info.dimensions[0] % type.blockSize == 0 else {
                throw reader.error(
                    .badDimensions,
                    "tensor \(info.name): rows of \(info.dimensions[0]) values do not split into \(type.name) blocks of "
                        + "\(type.blockSize)"
                )
            }
            let length = info.dimensions.reduce(1, *) / type.blockSize * type.blockBytes
            guard info.offset % UInt64(alignment) == 0 else {
                throw reader.error(
                    .misaligned, "tensor \(info.name) starts at data offset \(info.offset), not a multiple of the alignment \(alignment)")
            }
            guard info.offset <= UInt64(mapping.bytes.count - start), length <= mapping.bytes.count - start - Int(info.offset) else {
                throw reader.error(
                    .tensorPastEnd, "tensor \(info.name) (\(length) bytes at data offset \(info.offset)) runs past the end of the file")
            }
            tensors.append(
                GGUFTensor(name: info.name, dimensions: info.dimensions, type: type, offset: start + Int(info.offset), length: length))
        }
        let sorted = tensors.sorted { $0.offset < $1.offset }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.offset + a.length > b.offset {
            throw reader.error(.overlapping, "tensors \(a.name) and \(b.name) overlap")
        }
        self.tensors = tensors
    }

    public func tensor(_ name: String) -> GGUFTensor? { tensors.first { $0.name == name } }

    public func bytes(of tensor: GGUFTensor) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: mapping.bytes[tensor.offset..<tensor.offset + tensor.length])
    }

    /// Little-endian reads, each checked against the end of the file.
    private struct Reader {
        let bytes: UnsafeRawBufferPointer
        let path: String
        var position = 0

        func error(_ defect: GGUFDefect, _ detail: String) -> FormatError {
            .malformedGGUF(path: path, defect: defect, detail: detail)
        }

        mutating func take(_ count: Int, _ what: String) throws(FormatError) -> UnsafeRawBufferPointer {
            guard count >= 0, count <= bytes.count - position else {
                throw error(.truncated, "the file ends inside \(what) (at byte \(position), \(count) bytes needed)")
            }
            defer { position += count }
            return UnsafeRawBufferPointer(rebasing: bytes[position..<position + count])
        }

        mutating func load<T: FixedWidthInteger>(_ type: T.Type, _ what: String) throws(FormatError) -> T {
            T(littleEndian: try take(MemoryLayout<T>.size, what).loadUnaligned(as: T.self))
        }

        mutating func u32(_ what: String) throws(FormatError) -> UInt32 { try load(UInt32.self, what) }
        mutating func u64(_ what: String) throws(FormatError) -> UInt64 { try load(UInt64.self, what) }

        /// A count that the rest of the file can hold at `least` bytes per item.
        mutating func count(_ what: String, limit: Int, least: Int) throws(FormatError) -> Int {
            let at = position
            let n = try u64(what)
            guard n <= UInt64(limit), n <= UInt64((bytes.count - position) / least) else {
                throw error(
                    .absurdCount,
                    "\(what) at byte \(at) is \(n); the file has room for at most \(min(limit, (bytes.count - position) / least))")
            }
            return Int(n)
        }

        mutating func string(_ what: String) throws(FormatError) -> String {
            let at = position
            let length = try u64("the length of \(what)")
            guard length <= UInt64(GGUFFile.limits.string), length <= UInt64(bytes.count - position) else {
                throw error(.stringPastEnd, "\(what) at byte \(at) claims \(length) bytes; \(bytes.count - position) remain")
            }
            let raw = try take(Int(length), what)
            guard let s = String(validating: raw, as: UTF8.self) else {
                throw error(.invalidValue, "\(what) at byte \(at) is not valid UTF-8")
            }
            return s
        }

        mutating func value(type: UInt32, of key: String, depth: Int) throws(FormatError) -> GGUFValue {
            let what = "the value of \(key)"
            switch type {
            case 0: return .uint8(try load(UInt8.self, what))
            case 1: return .int8(try load(Int8.self, what))
            case 2: return .uint16(try load(UInt16.self, what))
            case 3: return .int16(try load(Int16.self, what))
            case 4: return .uint32(try load(UInt32.self, what))
            case 5: return .int32(try load(Int32.self, what))
            case 6: return .float32(Float(bitPattern: try load(UInt32.self, what)))
            case 7:
                let b = try load(UInt8.self, what)
                guard b <= 1 else { throw error(.invalidValue, "\(key) is a bool of \(b)") }
                return .bool(b == 1)
            case 8: return .string(try string(what))
            case 9:
                guard depth < GGUFFile.limits.depth else {
                    throw error(.invalidValue, "\(key) nests arrays more than \(GGUFFile.limits.depth) deep")
                }
                let element = try u32("the element type of \(key)")
                guard GGUFValue.typeNames[element] != nil else {
                    throw error(.unknownValueType, "\(key) is an array of unknown type \(element)")
                }
                let size: Int = [0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 8, 9: 12, 10: 8, 11: 8, 12: 8][element]!
                let n = try count("the length of \(key)", limit: bytes.count, least: size)
                var items: [GGUFValue] = []
                items.reserveCapacity(n)
                for _ in 0..<n { items.append(try value(type: element, of: key, depth: depth + 1)) }
                return .array(element, items)
            case 10: return .uint64(try load(UInt64.self, what))
            case 11: return .int64(try load(Int64.self, what))
            case 12: return .float64(Double(bitPattern: try load(UInt64.self, what)))
            default: throw error(.unknownValueType, "\(key) has unknown value type \(type)")
            }
        }
    }
}
