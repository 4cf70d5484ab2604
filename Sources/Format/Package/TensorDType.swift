/// Element types a package can store. Float types hold one value per element; the quantised
/// types hold blocks of 32 values along each row (ggml's layouts, `specs/FORMAT.md`).
public enum TensorDType: String, Sendable, CaseIterable, Codable {
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
public enum TensorLayout: String, Sendable, Codable {
    /// Same shape and element order as the source.
    case rowMajor = "row_major"
    /// The transpose of a 2-D source tensor (expert `down` matrices: neuron-major).
    case transposed
    /// Same element order as the source, Q4_0 rows stored in groups of eight with their blocks
    /// interleaved (`Q4_0Groups`): what the eight-row kernels read. Format 2 and later.
    case rowMajorX8 = "row_major_x8"

    /// The orientation relative to the source (regrouping rows does not transpose).
    public var orientation: TensorLayout { self == .transposed ? .transposed : .rowMajor }
}

/// The `row_major_x8` arrangement of a Q4_0 matrix: rows in groups of eight; for each group and
/// each block column, the eight rows' float16 scales (16 bytes), then four 32-byte chunks, chunk c
/// holding bytes 2+4c ..< 6+4c of each row's 18-byte block, in row order. A group occupies exactly
/// the bytes of its eight rows, so offsets, lengths and CRCs work as for plain rows.
public enum Q4_0Groups {
    public static let rows = 8
    static let blockBytes = 18

    /// Regroups `rowCount` (a multiple of 8) plain rows of `rowBytes` bytes from `source` into `target`.
    public static func interleave(_ source: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        precondition(rowCount % rows == 0 && rowBytes % blockBytes == 0)
        var out = target
        for group in stride(from: 0, to: rowCount, by: rows) {
            for block in 0..<rowBytes / blockBytes {
                for i in 0..<rows {
                    out.copyMemory(from: source + (group + i) * rowBytes + block * blockBytes, byteCount: 2)
                    out += 2
                }
                for chunk in 0..<4 {
                    for i in 0..<rows {
                        out.copyMemory(from: source + (group + i) * rowBytes + block * blockBytes + 2 + 4 * chunk, byteCount: 4)
                        out += 4
                    }
                }
            }
        }
    }

    /// Row `row` of a regrouped matrix back as a plain row of `rowBytes` bytes.
    public static func row(_ row: Int, of packed: UnsafeRawPointer, rowBytes: Int, into target: UnsafeMutableRawPointer) {
        let group = packed + row / rows * rows * rowBytes, i = row % rows
        for block in 0..<rowBytes / blockBytes {
            let p = group + block * rows * blockBytes, out = target + block * blockBytes
            out.copyMemory(from: p + 2 * i, byteCount: 2)
            for chunk in 0..<4 {
                (out + 2 + 4 * chunk).copyMemory(from: p + 2 * rows + 32 * chunk + 4 * i, byteCount: 4)
            }
        }
    }

    /// Undoes `interleave` for `rowCount` rows.
    public static func deinterleave(_ packed: UnsafeRawPointer, into target: UnsafeMutableRawPointer, rowBytes: Int, rowCount: Int) {
        for r in 0..<rowCount { row(r, of: packed, rowBytes: rowBytes, into: target + r * rowBytes) }
    }
}
