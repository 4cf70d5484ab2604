import CKernels

/// A batch of activation vectors (`count` rows of `columns` floats) with its Q8_0 form, made on
/// first use by a quantised weight and reused by every product that reads the same input (q, k
/// and v all read the normed residual: one quantisation serves three products).
public final class ActivationBatch: @unchecked Sendable {
    public let columns: Int
    public let capacity: Int
    public let floats: UnsafeMutablePointer<Float>
    public private(set) var count = 0
    /// The Q8_0 form's storage (valid for the rows `quantizedForm()` has filled), nil when the
    /// width is not a multiple of 32.
    let quantized: QuantizedActivations?
    private var quantizedCount = 0

    /// What a batch of `capacity` rows of `columns` floats allocates: the floats, and for widths
    /// that are a multiple of 32 the Q8_0 form (`QuantizedActivations.bytes`).
    static func bytes(columns: Int, capacity: Int) -> Int {
        4 * columns * capacity + (columns % 32 == 0 ? QuantizedActivations.bytes(columns: columns, capacity: capacity) : 0)
    }

    /// What this batch allocated.
    var allocatedBytes: Int { 4 * columns * capacity + (quantized?.allocatedBytes ?? 0) }

    public init(columns: Int, capacity: Int) {
        self.columns = columns
        self.capacity = capacity
        floats = .allocate(capacity: columns * capacity)
        floats.initialize(repeating: 0, count: columns * capacity)
        quantized = columns % 32 == 0 ? QuantizedActivations(columns: columns, capacity: capacity) : nil
    }

    deinit {
        floats.deallocate()
        quantized?.deallocate()
    }

    /// Declares that rows 0..<count now hold new values (invalidates the Q8_0 form).
    public func setCount(_ count: Int) {
        precondition(count <= capacity)
        self.count = count
        quantizedCount = 0
    }

    public func row(_ index: Int) -> UnsafeMutablePointer<Float> { floats + index * columns }

    /// Appends a copy of `source`'s row `sourceRow`, with its Q8_0 form when the source has made
    /// it, so rows gathered from a quantised batch are not quantised a second time.
    func append(row sourceRow: Int, of source: ActivationBatch) {
        precondition(count < capacity && source.columns == columns)
        let index = count
        row(index).update(from: source.row(sourceRow), count: columns)
        count += 1
        if let quantized, let from = source.quantized, quantizedCount == index, sourceRow < source.quantizedCount {
            let blocks = columns / 32
            (quantized.scales + index * blocks).update(from: from.scales + sourceRow * blocks, count: blocks)
            (quantized.sums + index * blocks).update(from: from.sums + sourceRow * blocks, count: blocks)
            (quantized.values + index * columns).update(from: from.values + sourceRow * columns, count: columns)
            if let to = quantized.interleaved, let from = from.interleaved {
                (to + index * columns).update(from: from + sourceRow * columns, count: columns)
            }
            quantizedCount += 1
        }
    }

    func quantizedForm() -> QuantizedActivations {
        guard let quantized else { preconditionFailure("Q8_0 activations need a width that is a multiple of 32") }
        while quantizedCount < count {
            quantized.quantize(row(quantizedCount), at: quantizedCount)
            quantizedCount += 1
        }
        return quantized
    }
}

public enum MatMul {
    /// Work below this many multiply-adds runs on the calling thread (a parallel region costs a
    /// microsecond or two; the 4B's router, 49K multiply-adds of float32, is worth splitting).
    static let parallelThreshold = 1 << 15

    /// y[t][r] = W[r] · x[t] for every activation row t and weight row r; `y` has rows of
    /// `outputStride` floats. Float weights use float activations; Q4_0/Q8_0 weights use the
    /// Q8_0 form and integer block dot products.
    public static func multiply(
        _ w: WeightMatrix, _ x: ActivationBatch, into y: UnsafeMutablePointer<Float>, outputStride: Int, threads: Int
    ) {
        withUnsafeTemporaryAllocation(of: Product.self, capacity: 1) { products in
            products.initialize(repeating: Product(weights: w, output: y, stride: outputStride))
            multiply(UnsafeBufferPointer(products), x, threads: threads)
            // A temporary allocation is not deinitialised for us: without this every call kept
            // one more reference to the matrix's name (the fuzzer's leak check found it).
            _ = products.deinitialize()
        }
    }

    /// One weight matrix and where its results go (`stride` floats per activation row).
    public struct Product {
        public var weights: WeightMatrix
        public var output: UnsafeMutablePointer<Float>
        public var stride: Int
        public init(weights: WeightMatrix, output: UnsafeMutablePointer<Float>, stride: Int) {
            self.weights = weights
            self.output = output
            self.stride = stride
        }
    }

    /// Three products of the same activations (q, k and v) in one parallel region, without
    /// allocating.
    public static func multiply(_ a: Product, _ b: Product, _ c: Product, _ x: ActivationBatch, threads: Int) {
        withUnsafeTemporaryAllocation(of: Product.self, capacity: 3) { products in
            products.initializeElement(at: 0, to: a)
            products.initializeElement(at: 1, to: b)
            products.initializeElement(at: 2, to: c)
            multiply(UnsafeBufferPointer(products), x, threads: threads)
            _ = products.deinitialize()
        }
    }

    /// Several products of the same activations in one parallel region: each worker takes its
    /// share of every matrix's rows.
    static func multiply(_ products: UnsafeBufferPointer<Product>, _ x: ActivationBatch, threads: Int) {
        let count = x.count
        var work = 0, quantized = false
        for p in products {
            work += p.weights.rows * p.weights.columns * count
            quantized = quantized || p.weights.dtype.isQuantized
        }
        let q = quantized ? x.quantizedForm() : nil
        for p in products {
            precondition(x.columns == p.weights.columns, "\(p.weights.name): \(p.weights.columns) columns, activations have \(x.columns)")
        }
        let slices = work >= parallelThreshold ? max(1, threads) : 1
        let shared = Unchecked((products, x, q))
        parallelForOnThisTier(slices) { slice in
            let (products, x, q) = shared.value
            for p in products {
                let w = p.weights, y = p.output, outputStride = p.stride
                if w.layout == .rowMajorX8, let q {
                    let groups = w.rows / 8
                    st_matmul_q4_0_x8(
                        w.base, Int32(w.columns / 32), Int32(groups * slice / slices), Int32(groups * (slice + 1) / slices),
                        q.scales, q.values, q.sums, Int32(count), y, Int32(outputStride))
                    continue
                }
                let first = w.rows * slice / slices, last = w.rows * (slice + 1) / slices
                if w.layout == .rowMajorB8, let q {
                    st_matmul_q4_0_b8(
                        w.base, Int32(w.rowBytes), Int32(first), Int32(last), q.scales, q.interleaved!, q.sums,
                        Int32(w.columns / 32), Int32(count), nil, y, Int32(outputStride))
                    continue
                }
                if let q, w.dtype.isQuantized {
                    st_matmul_quantized(
                        w.dtype == .q8_0 ? 1 : 0, w.base, Int32(w.rowBytes), Int32(first), Int32(last), q.scales, q.values,
                        q.sums, Int32(w.columns / 32), Int32(count), y, Int32(outputStride))
                    continue
                }
                for r in first..<last {
                    let row = w.row(r)
                    for t in 0..<count {
                        y[t * outputStride + r] = MatMul.dot(row, w.dtype, x.row(t), nil, nil, nil, w.columns)
                    }
                }
            }
        }
    }

    /// One row · one activation vector, for any weight dtype (quantised weights use the Q8_0 form).
    @inline(__always)
    static func dot(
        _ row: UnsafeRawPointer, _ dtype: TensorDType, _ x: UnsafePointer<Float>,
        _ scales: UnsafePointer<Float>?, _ values: UnsafePointer<Int8>?, _ sums: UnsafePointer<Int32>?, _ n: Int
    ) -> Float {
        switch dtype {
        case .f32: return DotKernels.f32(row, x, n)
        case .bf16: return DotKernels.bf16(row, x, n)
        case .f16: return DotKernels.f16(row, x, n)
        case .q4_0: return DotKernels.q4_0(row, scales!, values!, sums!, n / 32)
        case .q8_0: return DotKernels.q8_0(row, scales!, values!, sums!, n / 32)
        }
    }
}
