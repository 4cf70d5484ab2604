import CKernels

/// The row kernels the runtime uses: C implementations for the portable, AVX2 and AVX-512 VNNI
/// instruction sets, the best one for this CPU selected once (tests reach each set's kernels
/// through `st_kernels_for`). The tests' `ReferenceKernels` is their plain definition.
public enum DotKernels {
    public enum InstructionSet: Int32, CaseIterable, Sendable {
        case portable = 0, avx2 = 1, avx512 = 2, neon = 3, neonDotProd = 4
    }

    /// The best instruction set this CPU has.
    public static var detected: InstructionSet { InstructionSet(rawValue: st_detect_isa()) ?? .portable }
    /// The instruction set the calling thread's kernel calls use.
    public static var active: InstructionSet { InstructionSet(rawValue: st_kernels_isa()) ?? .portable }

    @inline(__always)
    public static func f32(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        st_dot_f32(row.assumingMemoryBound(to: Float.self), x, Int32(n))
    }

    @inline(__always)
    public static func bf16(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        st_dot_bf16(row.assumingMemoryBound(to: UInt16.self), x, Int32(n))
    }

    @inline(__always)
    public static func f16(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        st_dot_f16(row.assumingMemoryBound(to: UInt16.self), x, Int32(n))
    }

    @inline(__always)
    public static func q4_0(
        _ row: UnsafeRawPointer, _ scales: UnsafePointer<Float>, _ values: UnsafePointer<Int8>, _ sums: UnsafePointer<Int32>, _ blocks: Int
    ) -> Float {
        st_dot_q4_0(row, scales, values, sums, Int32(blocks))
    }

    @inline(__always)
    public static func q8_0(
        _ row: UnsafeRawPointer, _ scales: UnsafePointer<Float>, _ values: UnsafePointer<Int8>, _ sums: UnsafePointer<Int32>, _ blocks: Int
    ) -> Float {
        st_dot_q8_0(row, scales, values, sums, Int32(blocks))
    }

    /// One quantised row against `tokens` activation vectors; results to out[t * outStride].
    @inline(__always)
    public static func quantizedTokens(
        _ row: UnsafeRawPointer, dtype: TensorDType, _ a: QuantizedActivations, first: Int = 0, tokens: Int,
        into out: UnsafeMutablePointer<Float>, outStride: Int
    ) {
        let blocks = a.columns / 32
        let s = a.scales + first * blocks, v = a.values + first * a.columns, m = a.sums + first * blocks
        if dtype == .q4_0 {
            st_dot_q4_0_tokens(row, s, v, m, Int32(blocks), Int32(tokens), out, Int32(outStride))
        } else {
            st_dot_q8_0_tokens(row, s, v, m, Int32(blocks), Int32(tokens), out, Int32(outStride))
        }
    }

    /// y += a · row, for a row of any dtype (the neuron-major down matrices: each active neuron
    /// adds its row, scaled by its activation, to the output).
    @inline(__always)
    public static func addScaledRow(
        _ row: UnsafeRawPointer, dtype: TensorDType, scale a: Float, into y: UnsafeMutablePointer<Float>, _ n: Int
    ) {
        switch dtype {
        case .f32: st_axpy_f32(row.assumingMemoryBound(to: Float.self), a, y, Int32(n))
        case .bf16: st_axpy_bf16(row.assumingMemoryBound(to: UInt16.self), a, y, Int32(n))
        case .f16: st_axpy_f16(row.assumingMemoryBound(to: UInt16.self), a, y, Int32(n))
        case .q4_0: st_axpy_q4_0(row, a, y, Int32(n))
        case .q8_0: st_axpy_q8_0(row, a, y, Int32(n))
        }
    }

    /// Starts fetching a row that will be read soon (sparse row walks defeat the hardware prefetcher).
    @inline(__always)
    public static func prefetch(_ row: UnsafeRawPointer, bytes: Int) {
        st_prefetch(row, Int32(bytes))
    }

    /// Q8_0 activations: d = amax / 127 per block (float32), q = round-half-away(x / d).
    @inline(__always)
    public static func quantizeActivations(
        _ x: UnsafePointer<Float>, scales: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Int8>,
        sums: UnsafeMutablePointer<Int32>, _ n: Int
    ) {
        st_quantize_q8_0(x, scales, values, sums, Int32(n))
    }
}
