/// Conversions between float32, float16 and bfloat16, all rounding to nearest even.
public enum FloatCodecs {
    @inline(__always)
    public static func bf16ToFloat(_ bits: UInt16) -> Float {
        Float(bitPattern: UInt32(bits) << 16)
    }

    /// Round to nearest even; NaN stays NaN (quiet), infinities stay infinite.
    @inline(__always)
    public static func floatToBF16(_ value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let rounding = 0x7FFF + ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
    }

    @inline(__always)
    public static func f16ToFloat(_ bits: UInt16) -> Float {
        Float(Float16(bitPattern: bits))
    }

    @inline(__always)
    public static func floatToF16(_ value: Float) -> UInt16 {
        Float16(value).bitPattern
    }

    /// Decodes `count` float-typed elements starting at `source` into float32.
    public static func decode(_ source: UnsafeRawPointer, dtype: TensorDType, count: Int, into destination: UnsafeMutablePointer<Float>) {
        switch dtype {
        case .f32:
            destination.update(from: source.assumingMemoryBound(to: Float.self), count: count)
        case .bf16:
            let s = source.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count { destination[i] = bf16ToFloat(UInt16(littleEndian: s[i])) }
        case .f16:
            let s = source.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count { destination[i] = f16ToFloat(UInt16(littleEndian: s[i])) }
        case .q8_0, .q4_0:
            preconditionFailure("decode handles float types; use the block codecs for \(dtype)")
        }
    }

    /// Encodes float32 values as `dtype`. Returns the index of the first finite value that
    /// overflowed to infinity, if any (the caller decides whether that is an error).
    @discardableResult
    public static func encode(
        _ source: UnsafePointer<Float>, count: Int, as dtype: TensorDType, into destination: UnsafeMutableRawPointer
    ) -> Int? {
        var firstOverflow: Int?
        switch dtype {
        case .f32:
            destination.copyMemory(from: source, byteCount: count * 4)
        case .bf16:
            let d = destination.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count {
                let h = floatToBF16(source[i])
                d[i] = h.littleEndian
                if firstOverflow == nil, source[i].isFinite, (h & 0x7FFF) == 0x7F80 { firstOverflow = i }
            }
        case .f16:
            let d = destination.assumingMemoryBound(to: UInt16.self)
            for i in 0..<count {
                let h = floatToF16(source[i])
                d[i] = h.littleEndian
                if firstOverflow == nil, source[i].isFinite, (h & 0x7FFF) == 0x7C00 { firstOverflow = i }
            }
        case .q8_0, .q4_0:
            preconditionFailure("encode handles float types; use the block codecs for \(dtype)")
        }
        return firstOverflow
    }
}
