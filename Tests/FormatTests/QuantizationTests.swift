import Foundation
import Testing
@testable import Format

/// The block codecs against golden vectors from the `gguf` package (bit-exact with ggml), and
/// their round-trip error against named bounds.
@Suite struct QuantizationTests {
    struct Golden: Decodable, CustomTestStringConvertible, Sendable {
        let name: String
        let input: String
        let q4_0: String
        let q8_0: String
        let f16: String
        var testDescription: String { name }

        var values: [Float] { Data(base64Encoded: input)!.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) } }
        func bytes(_ key: KeyPath<Golden, String>) -> [UInt8] { [UInt8](Data(base64Encoded: self[keyPath: key])!) }
    }

    static let golden: [Golden] = {
        struct File: Decodable { let cases: [Golden] }
        let url = URL(fileURLWithPath: Fixtures.root + "/quant/golden.json")
        return try! JSONDecoder().decode(File.self, from: Data(contentsOf: url)).cases
    }()

    func quantize(_ values: [Float], _ dtype: TensorDType) -> [UInt8] {
        var out = [UInt8](repeating: 0xAA, count: dtype.byteLength(shape: [values.count])!)
        values.withUnsafeBufferPointer { v in
            out.withUnsafeMutableBytes { TensorCodec.encode(v.baseAddress!, count: values.count, as: dtype, into: $0.baseAddress!) }
        }
        return out
    }

    func dequantize(_ bytes: [UInt8], _ dtype: TensorDType, count: Int) -> [Float] {
        var out = [Float](repeating: .nan, count: count)
        bytes.withUnsafeBytes { b in
            out.withUnsafeMutableBufferPointer { TensorCodec.decode(b.baseAddress!, dtype: dtype, count: count, into: $0.baseAddress!) }
        }
        return out
    }

    /// First differing byte, for a readable failure.
    func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
        guard let i = zip(a, b).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset else {
            return "lengths \(a.count) vs \(b.count)"
        }
        return "byte \(i): \(a[i]) vs expected \(b[i])"
    }

    @Test(arguments: golden)
    func q4_0MatchesGGMLBitForBit(_ g: Golden) {
        let ours = quantize(g.values, .q4_0), expected = g.bytes(\.q4_0)
        #expect(ours == expected, "\(firstDifference(ours, expected))")
    }

    @Test(arguments: golden)
    func q8_0MatchesGGMLBitForBit(_ g: Golden) {
        let ours = quantize(g.values, .q8_0), expected = g.bytes(\.q8_0)
        #expect(ours == expected, "\(firstDifference(ours, expected))")
    }

    @Test(arguments: golden)
    func float16RoundsToNearestEvenLikeNumpy(_ g: Golden) {
        let ours = quantize(g.values, .f16), expected = g.bytes(\.f16)
        #expect(ours == expected, "\(firstDifference(ours, expected))")
    }

    @Test func goldenSetCoversTheHardCases() {
        let names = Set(Self.golden.map(\.name))
        for needed in [
            "all zero", "tie, positive first", "tie, negative first", "negative maximum",
            "huge, scale overflows float16", "tiny, scale subnormal in float16", "float32 subnormals",
            "exact halves (q8_0 rounding)"
        ] {
            #expect(names.contains(needed))
        }
    }

    @Test func bfloat16RoundsToNearestEven() {
        // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to the even one (1.0).
        #expect(FloatCodecs.floatToBF16(1 + 0x1p-8) == 0x3F80)
        // 1 + 3·2^-8 is halfway between 1+2^-7 (odd) and 1+2^-6 (even): rounds up.
        #expect(FloatCodecs.floatToBF16(1 + 3 * 0x1p-8) == 0x3F82)
        #expect(FloatCodecs.floatToBF16(1 + 0x1p-8 + 0x1p-20) == 0x3F81, "above halfway rounds up")
        #expect(FloatCodecs.floatToBF16(-2.5) == 0xC020)
        #expect(FloatCodecs.floatToBF16(.infinity) == 0x7F80)
        #expect(FloatCodecs.bf16ToFloat(FloatCodecs.floatToBF16(.nan)).isNaN)
        #expect(FloatCodecs.floatToBF16(Float.greatestFiniteMagnitude) == 0x7F80, "rounds up to infinity")
    }

    /// Round trip on smooth random data: every value within the codec's per-block bound, and the
    /// RMS error within a named fraction of the RMS value. gguf's quantiser gives 0.087 (Q4_0)
    /// and 0.0054 (Q8_0) on Gaussian data like this; the limits leave 1.5x and 1.2x headroom.
    @Test(arguments: [(TensorDType.q4_0, Float(0.13)), (.q8_0, Float(0.0065))])
    func roundTripErrorStaysWithinBounds(dtype: TensorDType, rmsLimit: Float) {
        var generator = SplitMix64(seed: 7)
        let values = (0..<32 * 512).map { _ in generator.nextGaussian() * 0.02 }
        let back = dequantize(quantize(values, dtype), dtype, count: values.count)
        var sumSquares: Float = 0, sumValues: Float = 0
        for block in 0..<values.count / 32 {
            let range = block * 32..<(block + 1) * 32
            let amax = values[range].map(abs).max()!
            let bound = dtype == .q4_0 ? Q4_0.errorBound(blockMaxMagnitude: amax) : Q8_0.errorBound(blockMaxMagnitude: amax)
            for i in range {
                #expect(abs(back[i] - values[i]) <= bound, "value \(i): \(values[i]) came back as \(back[i])")
                sumSquares += (back[i] - values[i]) * (back[i] - values[i])
                sumValues += values[i] * values[i]
            }
        }
        let relativeRMS = (sumSquares / sumValues).squareRoot()
        #expect(relativeRMS < rmsLimit, "relative RMS error \(relativeRMS)")
        #expect(relativeRMS > rmsLimit / 4, "the bound is not loose by more than 4x (\(relativeRMS))")
    }

    /// The one-pass Q4_0 quantiser's error statistics equal decoding its blocks and comparing
    /// (up to the order of the double sums), on random data and on every golden case (zeros, ties,
    /// huge and subnormal scales), and its blocks are the plain quantiser's.
    @Test func q4_0ErrorStatisticsMatchADecodedComparison() {
        var generator = SplitMix64(seed: 11)
        let cases = [(0..<32 * 300).map { _ in generator.nextGaussian() * 0.05 }] + Self.golden.map(\.values)
        for values in cases {
            var blocks = [UInt8](repeating: 0, count: TensorDType.q4_0.byteLength(shape: [values.count])!)
            var error = QuantizationError()
            values.withUnsafeBufferPointer { v in
                blocks.withUnsafeMutableBytes { Q4_0.quantize(v.baseAddress!, count: values.count, into: $0.baseAddress!, error: &error) }
            }
            #expect(blocks == quantize(values, .q4_0))
            let back = dequantize(blocks, .q4_0, count: values.count)
            var sumSquaredError = 0.0, sumSquaredValue = 0.0
            var worst: Float = 0
            for (b, v) in zip(back, values) {
                sumSquaredError += Double((b - v) * (b - v))
                sumSquaredValue += Double(v * v)
                worst = max(worst, abs(b - v))
            }
            #expect(error.count == values.count)
            #expect(error.maxAbsoluteError == worst)
            for (ours, expected) in [(error.sumSquaredError, sumSquaredError), (error.sumSquaredValue, sumSquaredValue)] {
                // NaN or infinite (a scale that overflows float16) in both, or equal up to rounding.
                #expect(
                    ours.isNaN == expected.isNaN && (ours.isNaN || ours == expected || abs(ours - expected) <= 1e-12 * abs(expected)),
                    "\(ours) vs \(expected)")
            }
        }
    }

    @Test func quantisedRowsAreIndependentBlocks() {
        // Quantising a row in pieces gives the same bytes as in one go: blocks never interact.
        var generator = SplitMix64(seed: 3)
        let values = (0..<32 * 8).map { _ in generator.nextGaussian() }
        for dtype in [TensorDType.q4_0, .q8_0] {
            let whole = quantize(values, dtype)
            let pieces = quantize(Array(values[0..<96]), dtype) + quantize(Array(values[96...]), dtype)
            #expect(whole == pieces)
        }
    }
}

/// A small deterministic generator for test data.
struct SplitMix64 {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E3779B97F4A7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) &* 0x94D049BB133111EB
        return z ^ (z >> 31)
    }
    mutating func nextUniform() -> Float { Float(next() >> 40) / Float(1 << 24) }
    mutating func nextGaussian() -> Float {
        let u1 = max(nextUniform(), 1e-7), u2 = nextUniform()
        return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
    }
}
