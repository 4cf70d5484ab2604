import Format

/// Plain scalar versions of every kernel: the definition the fast kernels are tested against.
enum ReferenceKernels {
    static func dot(_ row: UnsafeRawPointer, dtype: TensorDType, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var w = [Float](repeating: 0, count: n)
        w.withUnsafeMutableBufferPointer { TensorCodec.decode(row, dtype: dtype, count: n, into: $0.baseAddress!) }
        var sum: Float = 0
        for i in 0..<n { sum += w[i] * x[i] }
        return sum
    }

    static func dotQuantized(
        _ row: UnsafeRawPointer, dtype: TensorDType, _ scales: UnsafePointer<Float>, _ values: UnsafePointer<Int8>, _ blocks: Int
    ) -> Float {
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

    static func addScaledRow(_ row: UnsafeRawPointer, dtype: TensorDType, scale a: Float, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        var w = [Float](repeating: 0, count: n)
        w.withUnsafeMutableBufferPointer { TensorCodec.decode(row, dtype: dtype, count: n, into: $0.baseAddress!) }
        for i in 0..<n { y[i] += a * w[i] }
    }
}
