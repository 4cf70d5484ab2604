/// Element types a package can store. Float types hold one value per element; the quantised
/// types hold blocks of 32 values along each row (ggml's layouts, `specs/FORMAT.md`).
public enum TensorDType: String, Sendable, CaseIterable {
    case f32, f16, bf16
    case q8_0, q4_0

    /// Values per block: 1 for float types.
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16: 1
        case .q8_0, .q4_0: 32
        }
    }

    /// Bytes per block.
    public var blockBytes: Int {
        switch self {
        case .f32: 4
        case .f16, .bf16: 2
        case .q8_0: 34
        case .q4_0: 18
        }
    }

    public var isQuantized: Bool { blockSize > 1 }

    /// Bytes taken by a tensor of `shape` (outermost first), or nil when the innermost dimension
    /// cannot be split into blocks or the size overflows.
    public func byteLength(shape: [Int]) -> Int? {
        guard let rowLength = shape.last else { return blockBytes }  // a scalar
        guard shape.allSatisfy({ $0 >= 0 }), rowLength % blockSize == 0 else { return nil }
        var total = rowLength / blockSize * blockBytes
        for dimension in shape.dropLast() {
            let (product, overflow) = total.multipliedReportingOverflow(by: dimension)
            guard !overflow else { return nil }
            total = product
        }
        return total
    }

    /// The name safetensors uses for a float dtype.
    public init?(safetensorsName: String) {
        switch safetensorsName {
        case "F32": self = .f32
        case "F16": self = .f16
        case "BF16": self = .bf16
        default: return nil
        }
    }
}

/// How a stored tensor relates to the checkpoint tensor it came from.
public enum TensorLayout: String, Sendable {
    /// Same shape and element order as the source.
    case rowMajor = "row_major"
    /// The transpose of a 2-D source tensor (expert `down` matrices: neuron-major).
    case transposed
    /// Same element order as the source, Q4_0 rows stored in groups of eight with their blocks
    /// interleaved (`RowMajorX8`): what the eight-row kernels read. Format 2 and later.
    case rowMajorX8 = "row_major_x8"
    /// Same element order as the source, each Q4_0 row's blocks stored in groups of eight,
    /// interleaved (`RowMajorB8`): rows stay separate, so a kernel can skip any one of
    /// them, yet eight blocks feed one vector. Format 3 and later.
    case rowMajorB8 = "row_major_b8"

    /// The orientation relative to the source (arranging rows or blocks in groups does not transpose).
    public var orientation: TensorLayout { self == .transposed ? .transposed : .rowMajor }

    /// Whether the blocks of a Q4_0 matrix are rearranged (row_major_x8 or row_major_b8).
    public var isGrouped: Bool { self == .rowMajorX8 || self == .rowMajorB8 }

    /// Rows that one rearranging step takes together: 8 for row_major_x8, else 1.
    public var rowUnit: Int { self == .rowMajorX8 ? RowMajorX8.rows : 1 }

    /// Whether a `dtype` matrix of `rows` rows of `rowBytes` bytes can be stored this way.
    public func fits(dtype: TensorDType, rows: Int, rowBytes: Int) -> Bool {
        switch self {
        case .rowMajor, .transposed: true
        case .rowMajorX8: dtype == .q4_0 && rows % RowMajorX8.rows == 0
        case .rowMajorB8: dtype == .q4_0 && rowBytes % Q4_0Octet.bytes == 0
        }
    }

    /// `rowCount` plain rows (a multiple of `rowUnit`) from `source` into `target` in this layout.
    public func arrange(plain source: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        switch self {
        case .rowMajor, .transposed: target.copyMemory(from: source, byteCount: rowBytes * rowCount)
        case .rowMajorX8: RowMajorX8.arrange(source, into: target, rowBytes: rowBytes, rowCount: rowCount)
        case .rowMajorB8: RowMajorB8.arrange(source, into: target, rowBytes: rowBytes, rowCount: rowCount)
        }
    }

    /// Undoes `arrange`: `rowCount` rows in this layout back to plain rows.
    public func plainRows(_ source: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        switch self {
        case .rowMajor, .transposed: target.copyMemory(from: source, byteCount: rowBytes * rowCount)
        case .rowMajorX8: RowMajorX8.plainRows(source, into: target, rowBytes: rowBytes, rowCount: rowCount)
        case .rowMajorB8: RowMajorB8.plainRows(source, into: target, rowBytes: rowBytes, rowCount: rowCount)
        }
    }
}

/// Eight Q4_0 blocks (18 bytes each, `stride` bytes apart) as one 144-byte group: their eight
/// float16 scales, then four 32-byte chunks, chunk c holding quant bytes 4c ..< 4c+4 of each
/// block in order. Both grouped layouts are made of these.
enum Q4_0Octet {
    /// Eight 18-byte blocks: 16 bytes of scales and 128 of quants (the kernels' `st_octet_q4_0`).
    static let bytes = 8 * TensorDType.q4_0.blockBytes
    static func pack(_ first: UnsafeRawPointer, stride: Int, into out: UnsafeMutableRawPointer) {
        for i in 0..<8 { (out + 2 * i).copyMemory(from: first + i * stride, byteCount: 2) }
        for chunk in 0..<4 {
            for i in 0..<8 { (out + 16 + 32 * chunk + 4 * i).copyMemory(from: first + i * stride + 2 + 4 * chunk, byteCount: 4) }
        }
    }

    /// Block `i` of a packed group back into its 18 bytes.
    static func unpack(_ group: UnsafeRawPointer, block i: Int, into out: UnsafeMutableRawPointer) {
        out.copyMemory(from: group + 2 * i, byteCount: 2)
        for chunk in 0..<4 { (out + 2 + 4 * chunk).copyMemory(from: group + 16 + 32 * chunk + 4 * i, byteCount: 4) }
    }
}

/// The `row_major_x8` arrangement of a Q4_0 matrix: rows in groups of eight; for each group and
/// each block column, the eight rows' blocks as one `Q4_0Octet`. A group occupies exactly the
/// bytes of its eight rows, so offsets, lengths and CRCs work as for plain rows.
public enum RowMajorX8 {
    public static let rows = 8
    private static let blockBytes = TensorDType.q4_0.blockBytes

    /// Arranges `rowCount` (a multiple of 8) plain rows of `rowBytes` bytes from `source` into `target`.
    public static func arrange(_ source: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        precondition(rowCount % rows == 0 && rowBytes % blockBytes == 0)
        var out = target
        for group in stride(from: 0, to: rowCount, by: rows) {
            for block in 0..<rowBytes / blockBytes {
                Q4_0Octet.pack(source + group * rowBytes + block * blockBytes, stride: rowBytes, into: out)
                out += rows * blockBytes
            }
        }
    }

    /// Row `row` of an arranged matrix back as a plain row of `rowBytes` bytes.
    public static func plainRow(_ row: Int, of packed: UnsafeRawPointer, rowBytes: Int, into target: UnsafeMutableRawPointer) {
        let group = packed + row / rows * rows * rowBytes
        for block in 0..<rowBytes / blockBytes {
            Q4_0Octet.unpack(group + block * rows * blockBytes, block: row % rows, into: target + block * blockBytes)
        }
    }

    /// Undoes `arrange` for `rowCount` rows.
    public static func plainRows(_ packed: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        for r in 0..<rowCount { plainRow(r, of: packed, rowBytes: rowBytes, into: target + r * rowBytes) }
    }
}

/// The `row_major_b8` arrangement of a Q4_0 matrix: each row on its own, its blocks in groups of
/// eight (blocks 8g … 8g+7 as one `Q4_0Octet`), so a row is still `rowBytes` bytes at the same
/// offset and rows can be read, or skipped, one at a time. The row length must be a multiple of
/// 256 values (eight blocks).
public enum RowMajorB8 {
    public static let blocks = 8

    /// Arranges `rowCount` plain rows of `rowBytes` bytes (a multiple of 144) from `source` into `target`.
    public static func arrange(_ source: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        let groupBytes = Q4_0Octet.bytes
        precondition(rowBytes % groupBytes == 0)
        for r in 0..<rowCount {
            for g in stride(from: 0, to: rowBytes, by: groupBytes) {
                Q4_0Octet.pack(source + r * rowBytes + g, stride: TensorDType.q4_0.blockBytes, into: target + r * rowBytes + g)
            }
        }
    }

    /// Undoes `arrange` for `rowCount` rows.
    public static func plainRows(_ packed: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        let groupBytes = Q4_0Octet.bytes
        for r in 0..<rowCount {
            for g in stride(from: 0, to: rowBytes, by: groupBytes) {
                for i in 0..<blocks {
                    Q4_0Octet.unpack(packed + r * rowBytes + g, block: i, into: target + r * rowBytes + g + i * TensorDType.q4_0.blockBytes)
                }
            }
        }
    }
}
