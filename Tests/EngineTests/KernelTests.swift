import Foundation
import Testing
@testable import Engine

/// Each fast kernel against its scalar reference, on awkward lengths and values.
@Suite struct KernelTests {
    struct Generator {
        var state: UInt64
        mutating func next() -> Float {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int64(bitPattern: state) >> 40) / Float(1 << 23)
        }
    }

    func encoded(_ values: [Float], _ dtype: TensorDType) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: dtype.byteLength(shape: [values.count])!)
        values.withUnsafeBufferPointer { v in out.withUnsafeMutableBytes { TensorCodec.encode(v.baseAddress!, count: values.count, as: dtype, into: $0.baseAddress!) } }
        return out
    }

    @Test(arguments: [TensorDType.f32, .bf16, .f16], [1, 7, 8, 15, 16, 17, 31, 96, 1536])
    func floatDotMatchesTheScalarReference(dtype: TensorDType, length: Int) {
        var g = Generator(state: UInt64(length))
        let w = (0..<length).map { _ in g.next() }, x = (0..<length).map { _ in g.next() }
        let row = encoded(w, dtype)
        row.withUnsafeBytes { r in
            x.withUnsafeBufferPointer { xp in
                let fast: Float
                switch dtype {
                case .f32: fast = DotKernels.f32(r.baseAddress!, xp.baseAddress!, length)
                case .bf16: fast = DotKernels.bf16(r.baseAddress!, xp.baseAddress!, length)
                default: fast = DotKernels.f16(r.baseAddress!, xp.baseAddress!, length)
                }
                let reference = ReferenceKernels.dot(r.baseAddress!, dtype: dtype, xp.baseAddress!, length)
                let scale = zip(w, x).reduce(Float(0)) { $0 + abs($1.0 * $1.1) }
                #expect(abs(fast - reference) <= 1e-6 * scale + 1e-7, "\(fast) vs \(reference)")
            }
        }
    }

    @Test(arguments: [TensorDType.q4_0, .q8_0], [32, 64, 1536])
    func quantisedDotMatchesTheScalarReferenceAndTheFloatResult(dtype: TensorDType, length: Int) {
        var g = Generator(state: 99 + UInt64(length))
        let w = (0..<length).map { _ in g.next() }, x = (0..<length).map { _ in g.next() * 3 }
        let row = encoded(w, dtype)
        let activations = QuantizedActivations(columns: length, capacity: 1)
        defer { activations.deallocate() }
        x.withUnsafeBufferPointer { activations.quantize($0.baseAddress!, at: 0) }
        row.withUnsafeBytes { r in
            let blocks = length / 32
            let fast = dtype == .q4_0
                ? DotKernels.q4_0(r.baseAddress!, activations.scales, activations.values, blocks)
                : DotKernels.q8_0(r.baseAddress!, activations.scales, activations.values, blocks)
            let reference = ReferenceKernels.dotQuantized(r.baseAddress!, dtype: dtype, activations.scales, activations.values, blocks)
            #expect(abs(fast - reference) <= 1e-5 * abs(reference) + 1e-6, "SIMD \(fast) vs scalar \(reference)")
            // Against float: the only difference is the activation's Q8_0 rounding, at most half a
            // step per value: |Σ w·(x − x̂)| ≤ Σ |w| · d_x / 2.
            let float = x.withUnsafeBufferPointer { ReferenceKernels.dot(r.baseAddress!, dtype: dtype, $0.baseAddress!, length) }
            var weights = [Float](repeating: 0, count: length)
            weights.withUnsafeMutableBufferPointer { TensorCodec.decode(r.baseAddress!, dtype: dtype, count: length, into: $0.baseAddress!) }
            var bound: Float = 0
            for b in 0..<blocks {
                let d = activations.scales[b]
                for j in 0..<32 { bound += abs(weights[b * 32 + j]) * d / 2 }
            }
            #expect(abs(fast - float) <= bound * 1.001 + 1e-5, "quantised \(fast) vs float \(float), bound \(bound)")
        }
    }

    @Test(arguments: [TensorDType.f32, .bf16, .f16, .q4_0, .q8_0], [32, 96, 1536])
    func addScaledRowMatchesTheScalarReference(dtype: TensorDType, length: Int) {
        var g = Generator(state: 5 + UInt64(length))
        let w = (0..<length).map { _ in g.next() }
        let start = (0..<length).map { _ in g.next() }
        let row = encoded(w, dtype)
        var fast = start, reference = start
        row.withUnsafeBytes { r in
            fast.withUnsafeMutableBufferPointer { DotKernels.addScaledRow(r.baseAddress!, dtype: dtype, scale: -0.37, into: $0.baseAddress!, length) }
            reference.withUnsafeMutableBufferPointer { ReferenceKernels.addScaledRow(r.baseAddress!, dtype: dtype, scale: -0.37, into: $0.baseAddress!, length) }
        }
        #expect(zip(fast, reference).allSatisfy { abs($0 - $1) <= 1e-6 }, "max diff \(zip(fast, reference).map { abs($0 - $1) }.max()!)")
    }

    @Test func activationQuantisationMatchesTheQ8_0Codec() {
        var g = Generator(state: 11)
        let x = (0..<96).map { _ in g.next() * 5 }
        let activations = QuantizedActivations(columns: 96, capacity: 2)
        defer { activations.deallocate() }
        x.withUnsafeBufferPointer { activations.quantize($0.baseAddress!, at: 1) }
        let blocks = encoded(x, .q8_0)
        for b in 0..<3 {
            let d = blocks.withUnsafeBytes { Float(Float16(bitPattern: $0.loadUnaligned(fromByteOffset: b * 34, as: UInt16.self))) }
            #expect(abs(activations.scales[3 + b] - d) <= d * 1e-3, "scale kept in float32, ggml rounds it to float16")
            for j in 0..<32 { #expect(activations.values[96 + b * 32 + j] == Int8(bitPattern: blocks[b * 34 + 2 + j])) }
        }
    }
}
