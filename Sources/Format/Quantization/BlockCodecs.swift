import CQuantize

/// ggml's Q4_0 block: a float16 scale, then 32 4-bit values in 16 bytes. Value i < 16 is the low
/// nibble of byte i, value 16 + i the high nibble; value = (nibble − 8) · d.
///
/// `quantize` is ggml's reference quantiser (`quantize_row_q4_0_ref`) operation for operation, so
/// the bytes are identical: the largest-magnitude value m (first on ties, sign kept) sets
/// d = m / −8; id = 1/d from the float32 d; nibble = min(15, trunc(x·id + 8.5)); d is stored
/// as float16 rounded to nearest even.
public enum Q4_0 {
    public static let blockSize = 32
    public static let blockBytes = 18

    /// Quantises `count` values (a multiple of 32) into `count / 32` blocks (in C: the Swift
    /// version did not vectorise and took most of stquant's time).
    public static func quantize(_ x: UnsafePointer<Float>, count: Int, into out: UnsafeMutableRawPointer) {
        precondition(count % blockSize == 0)
        st_quantize_q4_0(x, Int64(count), out.assumingMemoryBound(to: UInt8.self), nil, nil, nil)
    }

    /// `quantize`, and the round-trip error of the blocks written (what decoding them and
    /// comparing would give, up to the order of the sums, without a second pass).
    public static func quantize(
        _ x: UnsafePointer<Float>, count: Int, into out: UnsafeMutableRawPointer,
        error: inout QuantizationError
    ) {
        precondition(count % blockSize == 0)
        var sse = 0.0, ssv = 0.0
        var worst: Float = 0
        st_quantize_q4_0(x, Int64(count), out.assumingMemoryBound(to: UInt8.self), &sse, &ssv, &worst)
        error.count += count
        error.sumSquaredError += sse
        error.sumSquaredValue += ssv
        error.maxAbsoluteError = max(error.maxAbsoluteError, worst)
    }

    /// Quantises `rows` rows of `rowLength` values (a multiple of 32) as llama.cpp does with an
    /// importance matrix (`llama-quantize --imatrix`; ggml's `quantize_q4_0` with quant_weights),
    /// the bytes identical: `importance` holds one value per column (the mean square of what
    /// that column multiplies), and each block takes the scale of least error weighted by it.
    public static func quantize(
        _ x: UnsafePointer<Float>, rows: Int, rowLength: Int, importance: UnsafePointer<Float>, into out: UnsafeMutableRawPointer
    ) {
        precondition(rowLength % blockSize == 0)
        st_quantize_q4_0_weighted(x, Int64(rows), Int64(rowLength), importance, out.assumingMemoryBound(to: UInt8.self))
    }

    /// Quantises `rows` rows of `rowLength` values (a multiple of 32) with error feedback that
    /// keeps each row's rounding error e small in eᵀ H e, `factor` being `compensationFactor(h)`:
    /// GPTQ's order of work on ggml's blocks (cquantize.h, st_quantize_q4_0_compensated).
    public static func quantize(
        _ x: UnsafePointer<Float>, rows: Int, rowLength: Int, compensation factor: UnsafePointer<Double>,
        into out: UnsafeMutableRawPointer
    ) {
        precondition(rowLength % blockSize == 0)
        st_quantize_q4_0_compensated(x, Int64(rows), Int64(rowLength), factor, out.assumingMemoryBound(to: UInt8.self))
    }

    /// The factor `quantize(_:rows:rowLength:compensation:into:)` takes for `h` (n × n, row-major,
    /// symmetric positive definite): U upper triangular with Uᵀ U = H⁻¹. nil when H is not
    /// positive definite.
    public static func compensationFactor(_ h: [Double], n: Int) -> [Double]? {
        precondition(h.count == n * n)
        var u = [Double](repeating: 0, count: n * n)
        let status = h.withUnsafeBufferPointer { h in
            u.withUnsafeMutableBufferPointer { st_gptq_factor(h.baseAddress!, Int64(n), $0.baseAddress!) }
        }
        return status == 0 ? u : nil
    }

    public static func dequantize(_ blocks: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        precondition(count % blockSize == 0)
        for b in 0..<count / blockSize {
            let block = blocks + b * blockBytes
            let d = Float(Float16(bitPattern: UInt16(littleEndian: block.loadUnaligned(as: UInt16.self))))
            let qs = (block + 2).assumingMemoryBound(to: UInt8.self)
            let o = out + b * blockSize
            for j in 0..<blockSize / 2 {
                o[j] = Float(Int(qs[j] & 0x0F) - 8) * d
                o[j + blockSize / 2] = Float(Int(qs[j] >> 4) - 8) * d
            }
        }
    }

    /// The largest round-trip error a block can have. The codes run from −8 to +7 steps and the
    /// largest magnitude maps to −8, so values of the other sign near it are clipped at +7: up
    /// to one whole step |d| = amax / 8 (half a step elsewhere), plus float16 rounding of d
    /// applied to the largest code, with slack.
    public static func errorBound(blockMaxMagnitude amax: Float) -> Float {
        let d = amax / 8
        return d + 8 * d * Float(Float16.ulpOfOne) + Float(Float16.leastNonzeroMagnitude) * 8
    }
}

/// ggml's Q8_0 block: a float16 scale d = amax / 127, then 32 signed bytes round(x / d), rounding
/// half away from zero (ggml's `quantize_row_q8_0_ref`).
public enum Q8_0 {
    public static let blockSize = 32
    public static let blockBytes = 34

    public static func quantize(_ x: UnsafePointer<Float>, count: Int, into out: UnsafeMutableRawPointer) {
        precondition(count % blockSize == 0)
        for b in 0..<count / blockSize {
            let v = x + b * blockSize
            let block = out + b * blockBytes
            var amax: Float = 0
            for j in 0..<blockSize { amax = Swift.max(amax, abs(v[j])) }
            let d = amax / 127
            let id: Float = d != 0 ? 1 / d : 0
            block.storeBytes(of: Float16(d).bitPattern.littleEndian, as: UInt16.self)
            let qs = (block + 2).assumingMemoryBound(to: Int8.self)
            for j in 0..<blockSize {
                qs[j] = Int8(truncatingIfNeeded: Int32(convertingLikeX86: (v[j] * id).rounded(.toNearestOrAwayFromZero)))
            }
        }
    }

    public static func dequantize(_ blocks: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        precondition(count % blockSize == 0)
        for b in 0..<count / blockSize {
            let block = blocks + b * blockBytes
            let d = Float(Float16(bitPattern: UInt16(littleEndian: block.loadUnaligned(as: UInt16.self))))
            let qs = (block + 2).assumingMemoryBound(to: Int8.self)
            let o = out + b * blockSize
            for j in 0..<blockSize { o[j] = Float(qs[j]) * d }
        }
    }

    /// Half a step, plus float16 rounding of d applied to the largest code (127 steps), with slack.
    public static func errorBound(blockMaxMagnitude amax: Float) -> Float {
        let d = amax / 127
        return d / 2 + 127 * d * Float(Float16.ulpOfOne) + Float(Float16.leastNonzeroMagnitude) * 127
    }
}

/// Rows of any stored dtype to and from float32.
public enum TensorCodec {
    /// Decodes `count` values (whole blocks for quantised types) starting at `source`.
    public static func decode(_ source: UnsafeRawPointer, dtype: TensorDType, count: Int, into out: UnsafeMutablePointer<Float>) {
        switch dtype {
        case .f32, .f16, .bf16: FloatCodecs.decode(source, dtype: dtype, count: count, into: out)
        case .q4_0: Q4_0.dequantize(source, count: count, into: out)
        case .q8_0: Q8_0.dequantize(source, count: count, into: out)
        }
    }

    /// Encodes `count` values; returns the index of the first finite value that overflowed a
    /// float type (quantised types store an infinite scale instead, as ggml does).
    @discardableResult
    public static func encode(_ values: UnsafePointer<Float>, count: Int, as dtype: TensorDType, into out: UnsafeMutableRawPointer) -> Int?
    {
        switch dtype {
        case .f32, .f16, .bf16: return FloatCodecs.encode(values, count: count, as: dtype, into: out)
        case .q4_0: Q4_0.quantize(values, count: count, into: out); return nil
        case .q8_0: Q8_0.quantize(values, count: count, into: out); return nil
        }
    }
}

extension Int32 {
    /// cvttss2si: truncation toward zero; NaN or out of range gives Int32.min ("integer indefinite").
    @inline(__always)
    public init(convertingLikeX86 value: Float) {
        if value.isNaN || value >= 2_147_483_648 || value < -2_147_483_648 { self = .min } else { self = Int32(value) }
    }
}
