/// A 2-D weight matrix viewed in place in the memory-mapped package: `rows` rows of `columns`
/// values, each row `rowBytes` bytes of `dtype` (whole blocks for quantised types).
public struct WeightMatrix: @unchecked Sendable {
    public let name: String
    public let base: UnsafeRawPointer
    public let dtype: TensorDType
    public let rows: Int
    public let columns: Int
    public let rowBytes: Int

    public init(name: String, base: UnsafeRawPointer, dtype: TensorDType, rows: Int, columns: Int) {
        precondition(columns % dtype.blockSize == 0)
        self.name = name
        self.base = base
        self.dtype = dtype
        self.rows = rows
        self.columns = columns
        rowBytes = columns / dtype.blockSize * dtype.blockBytes
    }

    @inline(__always)
    public func row(_ index: Int) -> UnsafeRawPointer { base + index * rowBytes }

    /// Row `index` as float32 (for embeddings lookups and tests).
    public func decodeRow(_ index: Int, into out: UnsafeMutablePointer<Float>) {
        TensorCodec.decode(row(index), dtype: dtype, count: columns, into: out)
    }
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

    public init(columns: Int, capacity: Int) {
        precondition(columns % 32 == 0)
        self.columns = columns
        self.capacity = capacity
        scales = .allocate(capacity: capacity * columns / 32)
        values = .allocate(capacity: capacity * columns)
        sums = .allocate(capacity: capacity * columns / 32)
    }

    public func deallocate() {
        scales.deallocate()
        values.deallocate()
        sums.deallocate()
    }

    /// Quantises vector `index` (`columns` floats at `x`): d = amax / 127, q = round(x / d),
    /// rounding half away from zero, as ggml's quantize_row_q8_0.
    public func quantize(_ x: UnsafePointer<Float>, at index: Int) {
        let blocks = columns / 32
        DotKernels.quantizeActivations(x, scales: scales + index * blocks, values: values + index * columns, sums: sums + index * blocks, columns)
    }
}
