import CKernels
import Format
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A 2-D weight matrix: `rows` rows of `columns` values, each row `rowBytes` bytes of `dtype`
/// (whole blocks for quantised types), in a layout of the package format (`TensorLayout`; a
/// stored transpose is plain rows of the stored shape, so it reads as `.rowMajor`). Usually a
/// view in place in the memory-mapped package; Q4_0 matrices stored in plain rows are arranged
/// in `.rowMajorX8` at load for the eight-row kernels.
public struct WeightMatrix: @unchecked Sendable {
    public let name: String
    public let base: UnsafeRawPointer
    public let dtype: TensorDType
    public let rows: Int
    public let columns: Int
    public let rowBytes: Int
    /// `.rowMajor`, `.rowMajorX8` or `.rowMajorB8`.
    public let layout: TensorLayout

    public init(name: String, base: UnsafeRawPointer, dtype: TensorDType, rows: Int, columns: Int, layout: TensorLayout = .rowMajor) {
        let layout = layout == .transposed ? .rowMajor : layout
        precondition(columns % dtype.blockSize == 0)
        precondition(layout.fits(dtype: dtype, rows: rows, rowBytes: columns / dtype.blockSize * dtype.blockBytes))
        self.name = name
        self.base = base
        self.dtype = dtype
        self.rows = rows
        self.columns = columns
        self.layout = layout
        rowBytes = columns / dtype.blockSize * dtype.blockBytes
    }

    /// Whether this matrix is in plain rows that can be arranged in `.rowMajorX8` for the
    /// eight-row kernels.
    public var canArrangeInRowGroups: Bool {
        layout == .rowMajor && TensorLayout.rowMajorX8.fits(dtype: dtype, rows: rows, rowBytes: rowBytes) && rows > 0
    }

    /// Row `index` of a matrix in the `.rowMajor` or `.rowMajorB8` layout.
    @inline(__always)
    public func row(_ index: Int) -> UnsafeRawPointer { base + index * rowBytes }

    /// Row `index` as float32 (for embeddings lookups and tests).
    public func decodeRow(_ index: Int, into out: UnsafeMutablePointer<Float>) {
        switch layout {
        case .rowMajor, .transposed:
            TensorCodec.decode(row(index), dtype: dtype, count: columns, into: out)
        case .rowMajorX8, .rowMajorB8:
            withUnsafeTemporaryAllocation(byteCount: rowBytes, alignment: 16) { row in
                if layout == .rowMajorX8 {
                    RowMajorX8.plainRow(index, of: base, rowBytes: rowBytes, into: row.baseAddress!)
                } else {
                    RowMajorB8.plainRows(self.row(index), into: row.baseAddress!, rowBytes: rowBytes, rowCount: 1)
                }
                TensorCodec.decode(UnsafeRawPointer(row.baseAddress!), dtype: dtype, count: columns, into: out)
            }
        }
    }

    /// Row `index` · activation vector `t` (float `x`, and its Q8_0 form `q` for quantised
    /// weights), for a matrix in the `.rowMajor` or `.rowMajorB8` layout.
    @inline(__always)
    func dot(row index: Int, _ x: UnsafePointer<Float>, _ q: QuantizedActivations?, token t: Int) -> Float {
        let blocks = columns / 32
        if layout == .rowMajorB8, let q {
            var v: Float = 0
            st_matmul_q4_0_b8(
                row(index), Int32(rowBytes), 0, 1, q.scales + t * blocks, q.interleaved! + t * columns,
                q.sums + t * blocks, Int32(blocks), 1, nil, &v, 1)
            return v
        }
        return MatMul.dot(
            row(index), dtype, x, q.map { $0.scales + t * blocks }, q.map { $0.values + t * columns }, q.map { $0.sums + t * blocks },
            columns)
    }
}

/// Page-aligned anonymous memory that asks for transparent huge pages (fewer TLB misses when a
/// kernel streams through hundreds of megabytes), for weights copied at load.
final class WeightStorage: @unchecked Sendable {
    let base: UnsafeMutableRawPointer
    let count: Int

    init?(bytes: Int) {
        let huge = 2 << 20
        count = max(huge, (bytes + huge - 1) / huge * huge)
        guard let p = mmap(nil, count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else { return nil }
        #if os(Linux)
        _ = madvise(p, count, MADV_HUGEPAGE)
        #endif
        base = p
    }

    deinit { munmap(base, count) }
}

/// Activations quantised to Q8_0 for the integer dot products with Q4_0 and Q8_0 weights: per
/// block of 32 values a float32 scale and 32 signed bytes (ggml's block_q8_0 keeps the scale in
/// float16; float32 loses nothing and saves a conversion per block).
public struct QuantizedActivations {
    public let columns: Int
    public let capacity: Int
    public let scales: UnsafeMutablePointer<Float>
    public let values: UnsafeMutablePointer<Int8>
    /// Σ of each block's values (lets the Q4_0 kernels fold the −8 offset into one product).
    public let sums: UnsafeMutablePointer<Int32>
    /// The values reordered for `row_major_b8` rows (`st_interleave_q8_0_b8`); nil unless
    /// `columns` is a multiple of 256.
    public let interleaved: UnsafeMutablePointer<Int8>?

    /// What `init(columns:capacity:)` allocates: per block of 32 a scale and a sum, the values,
    /// and the interleaved copy when `columns` is a multiple of 256.
    static func bytes(columns: Int, capacity: Int) -> Int {
        capacity * (columns / 32 * 8 + columns + (columns % 256 == 0 ? columns : 0))
    }

    /// What this instance allocated.
    var allocatedBytes: Int { capacity * (columns / 32 * 8 + columns + (interleaved == nil ? 0 : columns)) }

    public init(columns: Int, capacity: Int) {
        precondition(columns % 32 == 0)
        self.columns = columns
        self.capacity = capacity
        scales = .allocate(capacity: capacity * columns / 32)
        values = .allocate(capacity: capacity * columns)
        sums = .allocate(capacity: capacity * columns / 32)
        interleaved = columns % 256 == 0 ? .allocate(capacity: capacity * columns) : nil
    }

    public func deallocate() {
        scales.deallocate()
        values.deallocate()
        sums.deallocate()
        interleaved?.deallocate()
    }

    /// Quantises vector `index` (`columns` floats at `x`): d = amax / 127, q = round(x / d),
    /// rounding half away from zero, as ggml's quantize_row_q8_0.
    public func quantize(_ x: UnsafePointer<Float>, at index: Int) {
        let blocks = columns / 32
        DotKernels.quantizeActivations(
            x, scales: scales + index * blocks, values: values + index * columns, sums: sums + index * blocks, columns)
        if let interleaved { st_interleave_q8_0_b8(values + index * columns, interleaved + index * columns, Int32(blocks)) }
    }
}
