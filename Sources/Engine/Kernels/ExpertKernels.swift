import CKernels

/// The Q8_0 form of consecutive activation vectors, from one token on, as the kernels read it:
/// a float32 scale and a value sum per block of 32, the values, and (for widths that are a
/// multiple of 256) the values interleaved for `row_major_b8` rows.
struct QuantizedRows {
    let scales: UnsafePointer<Float>
    let values: UnsafePointer<Int8>
    let interleaved: UnsafePointer<Int8>?
    let sums: UnsafePointer<Int32>
    /// Blocks of 32 per vector.
    let blocks: Int
}

extension QuantizedActivations {
    /// The vectors from `token` on.
    func rows(from token: Int) -> QuantizedRows {
        let blocks = columns / 32
        return QuantizedRows(
            scales: scales + token * blocks, values: values + token * columns,
            interleaved: interleaved.map { UnsafePointer($0 + token * columns) }, sums: sums + token * blocks, blocks: blocks)
    }
}

/// The kernel calls of the expert paths, with their arguments named (the C functions take them
/// positionally).
extension WeightMatrix {
    /// The eight rows from `row` (a multiple of 8) of a `.rowMajorX8` matrix against `tokens`
    /// vectors of `x`: row row + i of token t to out[t · stride + i].
    @inline(__always)
    func dotGroup(at row: Int, _ x: QuantizedRows, tokens: Int, into out: UnsafeMutablePointer<Float>, stride: Int) {
        st_matmul_q4_0_x8(base + row * rowBytes, Int32(x.blocks), 0, 1, x.scales, x.values, x.sums, Int32(tokens), out, Int32(stride))
    }

    /// Rows `rows` of a `.rowMajorB8` matrix against `tokens` vectors of `x` (interleaved form):
    /// row rows.lowerBound + i of token t to out[t · stride + i], for t in 0..<tokens or, with
    /// `listed`, the `tokens` indices it holds (each gets what the whole batch would give it).
    @inline(__always)
    func dotBlockGrouped(
        rows: Range<Int>, _ x: QuantizedRows, tokens: Int, listed: UnsafePointer<Int32>? = nil, into out: UnsafeMutablePointer<Float>,
        stride: Int
    ) {
        st_matmul_q4_0_b8(
            base + rows.lowerBound * rowBytes, Int32(rowBytes), 0, Int32(rows.count), x.scales, x.interleaved!, x.sums,
            Int32(x.blocks), Int32(tokens), listed, out, Int32(stride))
    }

    /// y += Σ coefficients[a] · row rows[a], for `count` rows of this Q4_0 matrix (plain rows).
    @inline(__always)
    func addRows(_ rows: UnsafePointer<Int32>, coefficients: UnsafePointer<Float>, count: Int, into y: UnsafeMutablePointer<Float>) {
        st_axpy_rows_q4_0(base, Int32(rowBytes), rows, coefficients, Int32(count), y, Int32(columns))
    }

    /// Two tokens' row lists (each ascending) at once: y0 += Σ c0 · rows0 and y1 += Σ c1 · rows1,
    /// each row both use unpacked once. `scratch` holds the merged list: 2 · ffn rows, 4 · ffn floats.
    @inline(__always)
    func addRows(
        _ rows0: UnsafePointer<Int32>, coefficients c0: UnsafePointer<Float>, count n0: Int, into y0: UnsafeMutablePointer<Float>,
        and rows1: UnsafePointer<Int32>, coefficients c1: UnsafePointer<Float>, count n1: Int, into y1: UnsafeMutablePointer<Float>,
        scratch: (rows: UnsafeMutablePointer<Int32>, coefficients: UnsafeMutablePointer<Float>)
    ) {
        st_axpy_rows_q4_0_pair(
            base, Int32(rowBytes), rows0, c0, Int32(n0), rows1, c1, Int32(n1), y0, y1, Int32(columns),
            scratch.rows, scratch.coefficients, scratch.coefficients + n0 + n1)
    }
}

extension ExpertWeights {
    /// out += weight · Σ_{j in neurons} relu(gate_j · x) · (up_j · x) · down_j for one token, in
    /// C: gate for every neuron, up and down only where gate > 0. `.groupedQ4_0` experts (neurons
    /// in whole groups of eight) fetch `next` into L2 while the down rows are added; `scratch`
    /// holds 2 · neurons.count floats.
    @inline(__always)
    func fusedReGLU(
        neurons: Range<Int>, token x: QuantizedRows, weight: Float, into out: UnsafeMutablePointer<Float>,
        scratch: UnsafeMutablePointer<Float>, prefetching next: UnsafeRawBufferPointer? = nil
    ) {
        switch tokenPath {
        case .groupedQ4_0:
            st_expert_q4_0_x8(
                gate.base, up.base, down.base, Int32(gate.rowBytes), Int32(neurons.lowerBound), Int32(neurons.upperBound),
                x.scales, x.values, up.layout == .rowMajorB8 ? x.interleaved : nil, x.sums, Int32(x.blocks), weight, out,
                scratch, next?.baseAddress, Int32(next?.count ?? 0))
        case .rowsQ4_0:
            st_expert_q4_0(
                gate.base, up.base, down.base, Int32(gate.rowBytes), Int32(neurons.lowerBound), Int32(neurons.upperBound),
                x.scales, x.values, x.sums, Int32(x.blocks), weight, out, scratch)
        case .groupedOtherDown, .generic:
            preconditionFailure("\(gate.name): no fused kernel for this expert's types and layouts")
        }
    }
}
