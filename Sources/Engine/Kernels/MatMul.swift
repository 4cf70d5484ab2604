import CKernels
import Synchronization

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

    /// Several products of the same activations in one parallel region. The rows are cut into
    /// chunks of whole groups of eight, and each worker takes the next chunk when it finishes one:
    /// the two cores of a shared machine rarely stream memory at the same speed, and a fixed share
    /// each left one waiting for the other. Each row is computed by the same kernel call whoever
    /// takes it, so the results do not depend on the split.
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
        guard work >= parallelThreshold, threads > 1 else {
            for p in products { multiply(p, rows: 0..<p.weights.rows, x, q) }
            return
        }
        // Chunks of about `chunkWork` multiply-adds, at most `chunksPerThread` per worker.
        let chunks = min(max(threads, work / chunkWork), threads * chunksPerThread)
        withUnsafeTemporaryAllocation(of: (product: Int, rows: Range<Int>).self, capacity: chunks + products.count) { table in
            var total = 0
            for (i, p) in products.enumerated() {
                let groups = (p.weights.rows + 7) / 8
                let share = max(1, min(groups, (chunks * p.weights.rows * p.weights.columns * count + work - 1) / work))
                for k in 0..<share {
                    let rows = 8 * (groups * k / share)..<min(p.weights.rows, 8 * (groups * (k + 1) / share))
                    table.initializeElement(at: total, to: (i, rows))
                    total += 1
                }
            }
            let next = Atomic<Int>(0)
            let shared = Unchecked((products, x, q, UnsafeBufferPointer(rebasing: table[0..<total])))
            parallelForOnThisTier(min(threads, total)) { _ in
                let (products, x, q, table) = shared.value
                while case let k = next.add(1, ordering: .relaxed).oldValue, k < table.count {
                    multiply(products[table[k].product], rows: table[k].rows, x, q)
                }
            }
            _ = table.baseAddress!.deinitialize(count: total)
        }
    }

    /// Decode-sized chunks: a million multiply-adds is about half a megabyte of Q4_0 weights
    /// (some tens of microseconds), against well under a microsecond to claim one.
    static let chunkWork = 1 << 20
    static let chunksPerThread = 64

    /// Rows `rows` (whole groups of eight, or running to the end) of one product.
    private static func multiply(_ p: Product, rows: Range<Int>, _ x: ActivationBatch, _ q: QuantizedActivations?) {
        let w = p.weights, y = p.output, outputStride = p.stride, count = x.count
        if w.layout == .rowMajorX8, let q {
            st_matmul_q4_0_x8(
                w.base, Int32(w.columns / 32), Int32(rows.lowerBound / 8), Int32(rows.upperBound / 8),
                q.scales, q.values, q.sums, Int32(count), y, Int32(outputStride))
            return
        }
        if w.layout == .rowMajorB8, let q {
            st_matmul_q4_0_b8(
                w.base, Int32(w.rowBytes), Int32(rows.lowerBound), Int32(rows.upperBound), q.scales, q.interleaved!, q.sums,
                Int32(w.columns / 32), Int32(count), nil, y, Int32(outputStride))
            return
        }
        if let q, w.dtype.isQuantized {
            st_matmul_quantized(
                w.dtype == .q8_0 ? 1 : 0, w.base, Int32(w.rowBytes), Int32(rows.lowerBound), Int32(rows.upperBound), q.scales, q.values,
                q.sums, Int32(w.columns / 32), Int32(count), y, Int32(outputStride))
            return
        }
        for r in rows {
            let row = w.row(r)
            for t in 0..<count {
                y[t * outputStride + r] = MatMul.dot(row, w.dtype, x.row(t), nil, nil, nil, w.columns)
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
