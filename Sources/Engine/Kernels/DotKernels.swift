/// Row · vector kernels, one per weight dtype. The fast versions use Swift's portable SIMD types
/// (lowered to the widest vector instructions the build targets) and finish any tail with the
/// same scalar loop as `ReferenceKernels`, which the tests compare them against.
public enum DotKernels {
    /// float32 row · float32 vector.
    @inline(__always)
    public static func f32(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        var i = 0
        let xr = UnsafeRawPointer(x)
        while i + 16 <= n {
            acc0 += row.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) * xr.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
            acc1 += row.loadUnaligned(fromByteOffset: i * 4 + 32, as: SIMD8<Float>.self) * xr.loadUnaligned(fromByteOffset: i * 4 + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var sum = (acc0 + acc1).sum()
        let w = row.assumingMemoryBound(to: Float.self)
        while i < n { sum += w[i] * x[i]; i += 1 }
        return sum
    }

    /// bfloat16 row · float32 vector (bf16 → f32 is a 16-bit shift).
    @inline(__always)
    public static func bf16(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        var i = 0
        let xr = UnsafeRawPointer(x)
        while i + 16 <= n {
            let h0 = SIMD8<UInt32>(truncatingIfNeeded: row.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<UInt16>.self)) &<< 16
            let h1 = SIMD8<UInt32>(truncatingIfNeeded: row.loadUnaligned(fromByteOffset: i * 2 + 16, as: SIMD8<UInt16>.self)) &<< 16
            acc0 += unsafeBitCast(h0, to: SIMD8<Float>.self) * xr.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
            acc1 += unsafeBitCast(h1, to: SIMD8<Float>.self) * xr.loadUnaligned(fromByteOffset: i * 4 + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var sum = (acc0 + acc1).sum()
        let w = row.assumingMemoryBound(to: UInt16.self)
        while i < n { sum += FloatCodecs.bf16ToFloat(w[i]) * x[i]; i += 1 }
        return sum
    }

    /// float16 row · float32 vector.
    @inline(__always)
    public static func f16(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD8<Float>()
        var i = 0
        let xr = UnsafeRawPointer(x)
        while i + 8 <= n {
            let h = row.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<Float16>.self)
            acc += SIMD8<Float>(h) * xr.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
            i += 8
        }
        var sum = acc.sum()
        let w = row.assumingMemoryBound(to: UInt16.self)
        while i < n { sum += FloatCodecs.f16ToFloat(w[i]) * x[i]; i += 1 }
        return sum
    }

    /// Q4_0 row · Q8_0 activations: integer dot products per block, scaled by both block scales.
    @inline(__always)
    public static func q4_0(_ row: UnsafeRawPointer, _ scales: UnsafePointer<Float>, _ values: UnsafePointer<Int8>, _ blocks: Int) -> Float {
        var sum: Float = 0
        let xr = UnsafeRawPointer(values)
        for b in 0..<blocks {
            let block = row + b * 18
            let d = Float(Float16(bitPattern: block.loadUnaligned(as: UInt16.self)))
            let packed = block.loadUnaligned(fromByteOffset: 2, as: SIMD16<UInt8>.self)
            let low = SIMD16<Int16>(truncatingIfNeeded: packed & 0x0F) &- 8
            let high = SIMD16<Int16>(truncatingIfNeeded: packed &>> 4) &- 8
            let x0 = SIMD16<Int16>(truncatingIfNeeded: xr.loadUnaligned(fromByteOffset: b * 32, as: SIMD16<Int8>.self))
            let x1 = SIMD16<Int16>(truncatingIfNeeded: xr.loadUnaligned(fromByteOffset: b * 32 + 16, as: SIMD16<Int8>.self))
            // |(-8...7) × (-127...127)| ≤ 1016; two of them fit Int16, the block sum needs Int32.
            let products = low &* x0 &+ high &* x1
            sum += d * scales[b] * Float(SIMD16<Int32>(truncatingIfNeeded: products).wrappedSum())
        }
        return sum
    }

    /// Q8_0 row · Q8_0 activations.
    @inline(__always)
    public static func q8_0(_ row: UnsafeRawPointer, _ scales: UnsafePointer<Float>, _ values: UnsafePointer<Int8>, _ blocks: Int) -> Float {
        var sum: Float = 0
        let xr = UnsafeRawPointer(values)
        for b in 0..<blocks {
            let block = row + b * 34
            let d = Float(Float16(bitPattern: block.loadUnaligned(as: UInt16.self)))
            let w0 = SIMD16<Int32>(truncatingIfNeeded: block.loadUnaligned(fromByteOffset: 2, as: SIMD16<Int8>.self))
            let w1 = SIMD16<Int32>(truncatingIfNeeded: block.loadUnaligned(fromByteOffset: 18, as: SIMD16<Int8>.self))
            let x0 = SIMD16<Int32>(truncatingIfNeeded: xr.loadUnaligned(fromByteOffset: b * 32, as: SIMD16<Int8>.self))
            let x1 = SIMD16<Int32>(truncatingIfNeeded: xr.loadUnaligned(fromByteOffset: b * 32 + 16, as: SIMD16<Int8>.self))
            sum += d * scales[b] * Float((w0 &* x0 &+ w1 &* x1).wrappedSum())
        }
        return sum
    }

    /// y += a · row, for a row of any dtype (the neuron-major down matrices: each active neuron
    /// adds its row, scaled by its activation, to the output).
    @inline(__always)
    public static func addScaledRow(_ row: UnsafeRawPointer, dtype: TensorDType, scale a: Float, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        let yr = UnsafeMutableRawPointer(y)
        switch dtype {
        case .f32:
            var i = 0
            while i + 8 <= n {
                let v = yr.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) + a * row.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self)
                yr.storeBytes(of: v, toByteOffset: i * 4, as: SIMD8<Float>.self)
                i += 8
            }
            let w = row.assumingMemoryBound(to: Float.self)
            while i < n { y[i] += a * w[i]; i += 1 }
        case .bf16:
            var i = 0
            while i + 8 <= n {
                let h = SIMD8<UInt32>(truncatingIfNeeded: row.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<UInt16>.self)) &<< 16
                let v = yr.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) + a * unsafeBitCast(h, to: SIMD8<Float>.self)
                yr.storeBytes(of: v, toByteOffset: i * 4, as: SIMD8<Float>.self)
                i += 8
            }
            let w = row.assumingMemoryBound(to: UInt16.self)
            while i < n { y[i] += a * FloatCodecs.bf16ToFloat(w[i]); i += 1 }
        case .f16:
            var i = 0
            while i + 8 <= n {
                let h = SIMD8<Float>(row.loadUnaligned(fromByteOffset: i * 2, as: SIMD8<Float16>.self))
                let v = yr.loadUnaligned(fromByteOffset: i * 4, as: SIMD8<Float>.self) + a * h
                yr.storeBytes(of: v, toByteOffset: i * 4, as: SIMD8<Float>.self)
                i += 8
            }
            let w = row.assumingMemoryBound(to: UInt16.self)
            while i < n { y[i] += a * FloatCodecs.f16ToFloat(w[i]); i += 1 }
        case .q4_0:
            for b in 0..<n / 32 {
                let block = row + b * 18
                let s = a * Float(Float16(bitPattern: block.loadUnaligned(as: UInt16.self)))
                let packed = block.loadUnaligned(fromByteOffset: 2, as: SIMD16<UInt8>.self)
                let low = SIMD16<Float>(SIMD16<Int32>(truncatingIfNeeded: packed & 0x0F) &- 8)
                let high = SIMD16<Float>(SIMD16<Int32>(truncatingIfNeeded: packed &>> 4) &- 8)
                let o = b * 32 * 4
                yr.storeBytes(of: yr.loadUnaligned(fromByteOffset: o, as: SIMD16<Float>.self) + s * low, toByteOffset: o, as: SIMD16<Float>.self)
                yr.storeBytes(of: yr.loadUnaligned(fromByteOffset: o + 64, as: SIMD16<Float>.self) + s * high, toByteOffset: o + 64, as: SIMD16<Float>.self)
            }
        case .q8_0:
            for b in 0..<n / 32 {
                let block = row + b * 34
                let s = a * Float(Float16(bitPattern: block.loadUnaligned(as: UInt16.self)))
                let q0 = SIMD16<Float>(SIMD16<Int32>(truncatingIfNeeded: block.loadUnaligned(fromByteOffset: 2, as: SIMD16<Int8>.self)))
                let q1 = SIMD16<Float>(SIMD16<Int32>(truncatingIfNeeded: block.loadUnaligned(fromByteOffset: 18, as: SIMD16<Int8>.self)))
                let o = b * 32 * 4
                yr.storeBytes(of: yr.loadUnaligned(fromByteOffset: o, as: SIMD16<Float>.self) + s * q0, toByteOffset: o, as: SIMD16<Float>.self)
                yr.storeBytes(of: yr.loadUnaligned(fromByteOffset: o + 64, as: SIMD16<Float>.self) + s * q1, toByteOffset: o + 64, as: SIMD16<Float>.self)
            }
        }
    }
}

/// Plain scalar versions of every kernel: the definition the fast kernels are tested against.
public enum ReferenceKernels {
    public static func dot(_ row: UnsafeRawPointer, dtype: TensorDType, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var w = [Float](repeating: 0, count: n)
        w.withUnsafeMutableBufferPointer { TensorCodec.decode(row, dtype: dtype, count: n, into: $0.baseAddress!) }
        var sum: Float = 0
        for i in 0..<n { sum += w[i] * x[i] }
        return sum
    }

    public static func dotQuantized(_ row: UnsafeRawPointer, dtype: TensorDType, _ scales: UnsafePointer<Float>, _ values: UnsafePointer<Int8>, _ blocks: Int) -> Float {
        var sum: Float = 0
        for b in 0..<blocks {
            let block = row + b * dtype.blockBytes
            let d = Float(Float16(bitPattern: block.loadUnaligned(as: UInt16.self)))
            var integer: Int32 = 0
            for j in 0..<32 {
                let q: Int32
                if dtype == .q4_0 {
                    let byte = block.load(fromByteOffset: 2 + j % 16, as: UInt8.self)
                    q = Int32(j < 16 ? byte & 0x0F : byte >> 4) - 8
                } else {
                    q = Int32(block.load(fromByteOffset: 2 + j, as: Int8.self))
                }
                integer += q * Int32(values[b * 32 + j])
            }
            sum += d * scales[b] * Float(integer)
        }
        return sum
    }

    public static func addScaledRow(_ row: UnsafeRawPointer, dtype: TensorDType, scale a: Float, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        var w = [Float](repeating: 0, count: n)
        w.withUnsafeMutableBufferPointer { TensorCodec.decode(row, dtype: dtype, count: n, into: $0.baseAddress!) }
        for i in 0..<n { y[i] += a * w[i] }
    }
}
