import CKernels
import Foundation
import Testing
@testable import Engine

/// Every instruction set's kernels against the scalar reference, on awkward lengths and values.
@Suite struct KernelTests {
    struct Generator {
        var state: UInt64
        mutating func next() -> Float {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int64(bitPattern: state) >> 40) / Float(1 << 23)
        }
    }

    /// The instruction sets this machine can run (the portable one always).
    static let sets = DotKernels.InstructionSet.supported

    func table(_ set: DotKernels.InstructionSet) -> st_kernel_table { st_kernels_for(set.rawValue)!.pointee }

    func encoded(_ values: [Float], _ dtype: TensorDType) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: dtype.byteLength(shape: [values.count])!)
        let overflow = values.withUnsafeBufferPointer { v in
            out.withUnsafeMutableBytes { TensorCodec.encode(v.baseAddress!, count: values.count, as: dtype, into: $0.baseAddress!) }
        }
        #expect(overflow == nil, "encoding \(values.count) values as \(dtype) overflowed at \(overflow ?? -1)")
        return out
    }

    /// `tokens` random activation vectors of `length` values, side by side in their Q8_0 form.
    func quantizedActivations(
        _ k: st_kernel_table, length: Int, tokens: Int, _ g: inout Generator
    ) -> (scales: [Float], values: [Int8], sums: [Int32]) {
        let blocks = length / 32
        var scales = [Float](repeating: 0, count: blocks * tokens)
        var values = [Int8](repeating: 0, count: length * tokens)
        var sums = [Int32](repeating: 0, count: blocks * tokens)
        for t in 0..<tokens {
            let x = (0..<length).map { _ in g.next() * 2 }
            scales.withUnsafeMutableBufferPointer { s in
                values.withUnsafeMutableBufferPointer { v in
                    sums.withUnsafeMutableBufferPointer { m in
                        k.quantize_q8_0(
                            x, s.baseAddress! + t * blocks, v.baseAddress! + t * length, m.baseAddress! + t * blocks, Int32(length))
                    }
                }
            }
        }
        return (scales, values, sums)
    }

    /// `rows` random Q4_0 rows of `length` values, back to back, and the bytes of one row.
    func q4_0Matrix(rows: Int, length: Int, _ g: inout Generator) -> (matrix: [UInt8], rowBytes: Int) {
        let matrix = (0..<rows).flatMap { _ in encoded((0..<length).map { _ in g.next() }, .q4_0) }
        return (matrix, matrix.count / rows)
    }

    /// out[t · stride + r] for rows `rows` of the plain Q4_0 `matrix` against every token's Q8_0
    /// activations equals the scalar reference, and nothing outside those rows was written (out
    /// starts as NaN).
    func expectRowsMatchTheReference(
        _ set: DotKernels.InstructionSet, matrix: [UInt8], rows: Range<Int>, length: Int, tokens: Int,
        scales: [Float], values: [Int8], out: [Float], stride: Int,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        let blocks = length / 32, rowBytes = blocks * TensorDType.q4_0.blockBytes
        matrix.withUnsafeBytes { m in
            for t in 0..<tokens {
                for r in rows {
                    let reference = scales.withUnsafeBufferPointer { s in
                        values.withUnsafeBufferPointer { v in
                            ReferenceKernels.dotQuantized(
                                m.baseAddress! + r * rowBytes, dtype: .q4_0, s.baseAddress! + t * blocks, v.baseAddress! + t * length,
                                blocks)
                        }
                    }
                    let fast = out[t * stride + r]
                    #expect(
                        abs(fast - reference) <= 1e-5 * abs(reference) + 1e-5,
                        "\(set) n=\(length) token \(t) row \(r): \(fast) vs scalar \(reference)",
                        sourceLocation: sourceLocation)
                }
            }
        }
        #expect(
            out.enumerated().allSatisfy { rows.contains($0.offset % stride) || $0.element.isNaN }, "wrote outside its rows",
            sourceLocation: sourceLocation)
    }

    /// Without STRUN_KERNELS the best set is selected; with it, the one it names.
    @Test func theConfiguredSetIsSelected() throws {
        let configured = try DotKernels.configured()
        #expect(DotKernels.active == configured)
        #expect(DotKernels.forcedByEnvironment || configured == DotKernels.detected)
        #expect(Self.sets.first == .portable && Self.sets.last == DotKernels.detected)
        #expect(Self.sets.allSatisfy { st_kernels_for($0.rawValue) != nil })
        #expect(st_kernels_for(99) == nil)
    }

    /// A tier is chosen by name; an unknown name, or a tier this CPU lacks, is a clear error.
    @Test func tierNamesAreCheckedAgainstTheCPU() throws {
        for tier in DotKernels.InstructionSet.allCases {
            #expect(DotKernels.InstructionSet(name: tier.name) == tier)
            if tier.isSupported {
                #expect(try DotKernels.resolve(tier.name.uppercased()) == tier)
            } else {
                #expect(throws: EngineError.self) { try DotKernels.resolve(tier.name) }
            }
        }
        #expect(try DotKernels.resolve(nil) == DotKernels.detected)
        do {
            _ = try DotKernels.resolve("sve2")
            Issue.record("an unknown tier was accepted")
        } catch {
            #expect(
                "\(error)".contains("STRUN_KERNELS=sve2 names no kernel tier")
                    && "\(error)".contains("portable, avx2, avx512, neon, neon-dotprod"))
        }
    }

    /// A thread's binding wins over the process-wide choice and is undone after; a tier the CPU
    /// lacks cannot be bound.
    @Test(arguments: sets)
    func aThreadBindsItsOwnTier(set: DotKernels.InstructionSet) throws {
        let before = DotKernels.active
        let inside = DotKernels.with(set) { DotKernels.active }
        #expect(inside == set && DotKernels.active == before)
        #expect(st_kernels_bind(99) == -2 && DotKernels.active == before)
        // Workers of a parallel region compute on the caller's tier.
        var seen = [Int32](repeating: -1, count: 8)
        seen.withUnsafeMutableBufferPointer { buffer in
            let out = Unchecked(buffer)
            DotKernels.with(set) { parallelForOnThisTier(8) { out.value[$0] = st_kernels_isa() } }
        }
        #expect(seen.allSatisfy { $0 == set.rawValue }, "\(seen)")
    }

    @Test(arguments: sets, [TensorDType.f32, .bf16, .f16])
    func floatDotMatchesTheReference(set: DotKernels.InstructionSet, dtype: TensorDType) {
        let k = table(set)
        for length in [1, 7, 8, 15, 16, 17, 31, 96, 1536] {
            var g = Generator(state: UInt64(length))
            let w = (0..<length).map { _ in g.next() }, x = (0..<length).map { _ in g.next() }
            let row = encoded(w, dtype)
            row.withUnsafeBytes { r in
                x.withUnsafeBufferPointer { xp in
                    let fast: Float
                    switch dtype {
                    case .f32: fast = k.dot_f32(r.baseAddress!.assumingMemoryBound(to: Float.self), xp.baseAddress!, Int32(length))
                    case .bf16: fast = k.dot_bf16(r.baseAddress!.assumingMemoryBound(to: UInt16.self), xp.baseAddress!, Int32(length))
                    default: fast = k.dot_f16(r.baseAddress!.assumingMemoryBound(to: UInt16.self), xp.baseAddress!, Int32(length))
                    }
                    let reference = ReferenceKernels.dot(r.baseAddress!, dtype: dtype, xp.baseAddress!, length)
                    let scale = zip(w, x).reduce(Float(0)) { $0 + abs($1.0 * $1.1) }
                    #expect(abs(fast - reference) <= 1e-6 * scale + 1e-7, "\(set) \(dtype) n=\(length): \(fast) vs \(reference)")
                }
            }
        }
    }

    @Test(arguments: sets, [TensorDType.q4_0, .q8_0])
    func quantisedDotMatchesTheReferenceAndTheFloatResult(set: DotKernels.InstructionSet, dtype: TensorDType) {
        let k = table(set)
        for length in [32, 64, 96, 1536] {
            var g = Generator(state: 99 + UInt64(length))
            let w = (0..<length).map { _ in g.next() }, x = (0..<length).map { _ in g.next() * 3 }
            let row = encoded(w, dtype)
            var scales = [Float](repeating: 0, count: length / 32)
            var values = [Int8](repeating: 0, count: length)
            var sums = [Int32](repeating: 0, count: length / 32)
            k.quantize_q8_0(x, &scales, &values, &sums, Int32(length))
            for b in 0..<length / 32 { #expect(sums[b] == values[b * 32..<(b + 1) * 32].reduce(Int32(0)) { $0 + Int32($1) }) }
            row.withUnsafeBytes { r in
                let blocks = length / 32
                let fast =
                    dtype == .q4_0
                    ? k.dot_q4_0(r.baseAddress!, scales, values, sums, Int32(blocks))
                    : k.dot_q8_0(r.baseAddress!, scales, values, sums, Int32(blocks))
                let reference = ReferenceKernels.dotQuantized(r.baseAddress!, dtype: dtype, scales, values, blocks)
                #expect(abs(fast - reference) <= 1e-5 * abs(reference) + 1e-5, "\(set) n=\(length): \(fast) vs scalar \(reference)")
                // Against float: the only difference is the activation's Q8_0 rounding, at most half a
                // step per value: |Σ w·(x − x̂)| ≤ Σ |w| · d_x / 2.
                let float = x.withUnsafeBufferPointer { ReferenceKernels.dot(r.baseAddress!, dtype: dtype, $0.baseAddress!, length) }
                var weights = [Float](repeating: 0, count: length)
                weights.withUnsafeMutableBufferPointer {
                    TensorCodec.decode(r.baseAddress!, dtype: dtype, count: length, into: $0.baseAddress!)
                }
                var bound: Float = 0
                for b in 0..<blocks { for j in 0..<32 { bound += abs(weights[b * 32 + j]) * scales[b] / 2 } }
                #expect(abs(fast - float) <= bound * 1.001 + 1e-5, "quantised \(fast) vs float \(float), bound \(bound)")
            }
        }
    }

    /// The many-token kernels equal the one-token kernel for every token, for counts that do and
    /// do not fill the four-token groups, and odd block counts.
    @Test(arguments: sets, [TensorDType.q4_0, .q8_0])
    func manyTokenDotEqualsOneTokenDots(set: DotKernels.InstructionSet, dtype: TensorDType) {
        let k = table(set)
        for (length, tokens) in [(64, 1), (64, 4), (96, 7), (1536, 9)] {
            var g = Generator(state: 7 + UInt64(length * tokens))
            let row = encoded((0..<length).map { _ in g.next() }, dtype)
            let blocks = length / 32
            let (scales, values, sums) = quantizedActivations(k, length: length, tokens: tokens, &g)
            var out = [Float](repeating: .nan, count: tokens * 3)
            row.withUnsafeBytes { r in
                let f = (dtype == .q4_0 ? k.dot_q4_0_tokens : k.dot_q8_0_tokens)!
                f(r.baseAddress!, scales, values, sums, Int32(blocks), Int32(tokens), &out, 3)
                for t in 0..<tokens {
                    let one = scales.withUnsafeBufferPointer { s in
                        values.withUnsafeBufferPointer { v in
                            sums.withUnsafeBufferPointer { m in
                                (dtype == .q4_0 ? k.dot_q4_0 : k.dot_q8_0)!(
                                    r.baseAddress!, s.baseAddress! + t * blocks, v.baseAddress! + t * length, m.baseAddress! + t * blocks,
                                    Int32(blocks))
                            }
                        }
                    }
                    #expect(abs(out[t * 3] - one) <= 1e-5 * abs(one) + 1e-5, "\(set) token \(t) of \(tokens): \(out[t * 3]) vs \(one)")
                }
            }
        }
    }

    /// The eight-row kernels on Q4_0 rows arranged in row groups equal the scalar reference row by row, for
    /// every token of a batch (token counts that do and do not fill the kernels' groups), each
    /// token's values bit for bit what it gets alone (several sequences decoding in one step get
    /// what each gets alone), and a arranged row comes back byte for byte.
    @Test(arguments: sets)
    func interleavedRowsMatchTheReference(set: DotKernels.InstructionSet) {
        let k = table(set)
        for (length, rows, tokens) in [(32, 8, 1), (64, 8, 2), (96, 16, 3), (96, 16, 5), (256, 8, 6), (1536, 24, 7), (1536, 24, 13)] {
            var g = Generator(state: 41 + UInt64(length * tokens))
            let (matrix, rowBytes) = q4_0Matrix(rows: rows, length: length, &g)
            let blocks = length / 32
            var packed = [UInt8](repeating: 0, count: matrix.count)
            matrix.withUnsafeBytes { m in
                packed.withUnsafeMutableBytes {
                    RowMajorX8.arrange(m.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: rows)
                }
            }
            #expect(packed != matrix)
            for r in 0..<rows {
                var back = [UInt8](repeating: 0, count: rowBytes)
                packed.withUnsafeBytes { p in
                    back.withUnsafeMutableBytes { RowMajorX8.plainRow(r, of: p.baseAddress!, rowBytes: rowBytes, into: $0.baseAddress!) }
                }
                #expect(back == Array(matrix[r * rowBytes..<(r + 1) * rowBytes]), "row \(r) does not come back")
            }
            let (scales, values, sums) = quantizedActivations(k, length: length, tokens: tokens, &g)
            let stride = rows + 3
            var out = [Float](repeating: .nan, count: tokens * stride)
            packed.withUnsafeBytes { p in
                for group in 0..<rows / 8 {
                    out.withUnsafeMutableBufferPointer { o in
                        k.dot_q4_0_x8(
                            p.baseAddress! + group * 8 * rowBytes, scales, values, sums, Int32(blocks), Int32(tokens),
                            o.baseAddress! + group * 8, Int32(stride))
                    }
                }
            }
            expectRowsMatchTheReference(
                set, matrix: matrix, rows: 0..<rows, length: length, tokens: tokens, scales: scales, values: values,
                out: out, stride: stride)
            for t in 0..<tokens {
                var alone = [Float](repeating: .nan, count: rows)
                let s: [Float] = Array(scales[(t * blocks)...]), v: [Int8] = Array(values[(t * length)...])
                let m: [Int32] = Array(sums[(t * blocks)...])
                packed.withUnsafeBytes { p in
                    alone.withUnsafeMutableBufferPointer { o in
                        for group in 0..<rows / 8 {
                            k.dot_q4_0_x8(
                                p.baseAddress! + group * 8 * rowBytes, s, v, m, Int32(blocks), 1, o.baseAddress! + group * 8, Int32(rows))
                        }
                    }
                }
                #expect(alone == Array(out[t * stride..<t * stride + rows]), "token \(t) of \(tokens) differs from it alone")
            }
        }
    }

    /// Rows whose blocks are grouped in eights (`row_major_b8`), read with interleaved
    /// activations, equal the scalar reference on the plain rows for every token of a batch
    /// (counts that do and do not fill the kernels' token groups); the rows come back byte for
    /// byte, and a product of a subset of rows writes only those.
    @Test(arguments: sets)
    func blockGroupedRowsMatchTheReference(set: DotKernels.InstructionSet) {
        let k = table(set)
        for (length, rows, tokens) in [(256, 3, 1), (512, 5, 4), (1536, 7, 13)] {
            var g = Generator(state: 97 + UInt64(length * tokens))
            let (matrix, rowBytes) = q4_0Matrix(rows: rows, length: length, &g)
            let blocks = length / 32
            var packed = [UInt8](repeating: 0, count: matrix.count)
            matrix.withUnsafeBytes { m in
                packed.withUnsafeMutableBytes {
                    TensorLayout.rowMajorB8.arrange(plain: m.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: rows)
                }
            }
            #expect(packed != matrix)
            var back = [UInt8](repeating: 0, count: matrix.count)
            packed.withUnsafeBytes { p in
                back.withUnsafeMutableBytes {
                    TensorLayout.rowMajorB8.plainRows(p.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: rows)
                }
            }
            #expect(back == matrix, "rows do not come back")
            let (scales, values, sums) = quantizedActivations(k, length: length, tokens: tokens, &g)
            var interleaved = [Int8](repeating: 0, count: values.count)
            values.withUnsafeBufferPointer { v in
                interleaved.withUnsafeMutableBufferPointer { o in
                    for t in 0..<tokens { st_interleave_q8_0_b8(v.baseAddress! + t * length, o.baseAddress! + t * length, Int32(blocks)) }
                }
            }
            #expect(interleaved.sorted() == values.sorted() && interleaved != values)
            let stride = rows + 3, first = 1
            var out = [Float](repeating: .nan, count: tokens * stride)
            packed.withUnsafeBytes { p in
                // One row or two at a time (the pair shares each token's activations).
                var r = first
                while r < rows {
                    let n = r % 3 == 0 ? 1 : min(2, rows - r)
                    out.withUnsafeMutableBufferPointer { o in
                        k.dot_q4_0_b8(
                            p.baseAddress! + r * rowBytes, Int32(rowBytes), Int32(n), scales, interleaved, sums, Int32(blocks),
                            Int32(tokens), nil, o.baseAddress! + r, Int32(stride))
                    }
                    r += n
                }
            }
            expectRowsMatchTheReference(
                set, matrix: matrix, rows: first..<rows, length: length, tokens: tokens, scales: scales, values: values,
                out: out, stride: stride)
            // One row against the first token while asking for another row (or none): the bits of
            // the plain kernel's one row and one token.
            packed.withUnsafeBytes { p in
                for r in 0..<rows {
                    let row = p.baseAddress! + r * rowBytes
                    var plain = Float.nan
                    k.dot_q4_0_b8(row, Int32(rowBytes), 1, scales, interleaved, sums, Int32(blocks), 1, nil, &plain, 1)
                    let ahead = k.dot_q4_0_b8_ahead(row, r + 2 < rows ? row + 2 * rowBytes : nil, scales, interleaved, sums, Int32(blocks))
                    #expect(!plain.isNaN && ahead.bitPattern == plain.bitPattern, "\(set) row \(r) asking ahead: \(ahead) vs \(plain)")
                }
            }
            // A list of tokens (out of order, every other one skipped) gives each listed token
            // exactly the value the whole batch gave it, one row or two at a time, and writes
            // nothing for the others.
            let listed = (0..<tokens).reversed().filter { $0 % 2 == 0 }.map(Int32.init)
            for n in 1...min(2, rows - first) {
                var some = [Float](repeating: .nan, count: tokens * stride)
                packed.withUnsafeBytes { p in
                    some.withUnsafeMutableBufferPointer { o in
                        k.dot_q4_0_b8(
                            p.baseAddress! + first * rowBytes, Int32(rowBytes), Int32(n), scales, interleaved, sums, Int32(blocks),
                            Int32(listed.count), listed, o.baseAddress! + first, Int32(stride))
                    }
                }
                for t in 0..<tokens {
                    for r in first..<first + n {
                        let i = t * stride + r
                        if t % 2 == 0 {
                            #expect(some[i].bitPattern == out[i].bitPattern, "\(set) listed token \(t) row \(r): \(some[i]) vs \(out[i])")
                        } else {
                            #expect(some[i].isNaN, "\(set) wrote token \(t), which is not listed")
                        }
                    }
                }
            }
        }
    }

    /// A product's rows are cut into chunks that whichever worker is free takes: the results do
    /// not depend on how many threads share them, bit for bit, for every layout in one parallel
    /// region (eight-row groups, blocks grouped in eights, plain Q4_0 rows whose count is not a
    /// multiple of eight, float rows), one token and a batch; every output is written once and
    /// nothing beside them.
    @Test(arguments: sets)
    func matrixProductsDoNotDependOnTheThreadCount(set: DotKernels.InstructionSet) {
        let length = 1024
        var g = Generator(state: 7)
        let (x8Plain, rowBytes) = q4_0Matrix(rows: 1032, length: length, &g)
        let (b8Plain, _) = q4_0Matrix(rows: 203, length: length, &g)
        let (plain, _) = q4_0Matrix(rows: 37, length: length, &g)
        let floats = encoded((0..<19 * length).map { _ in g.next() }, .f32)
        var x8 = x8Plain, b8 = b8Plain
        x8Plain.withUnsafeBytes { m in
            x8.withUnsafeMutableBytes { RowMajorX8.arrange(m.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: 1032) }
        }
        b8Plain.withUnsafeBytes { m in
            b8.withUnsafeMutableBytes {
                TensorLayout.rowMajorB8.arrange(plain: m.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: 203)
            }
        }
        let shapes: [(bytes: [UInt8], dtype: TensorDType, rows: Int, layout: TensorLayout)] = [
            (x8, .q4_0, 1032, .rowMajorX8), (b8, .q4_0, 203, .rowMajorB8), (plain, .q4_0, 37, .rowMajor), (floats, .f32, 19, .rowMajor)
        ]
        let weights = shapes.map { shape in
            let base = UnsafeMutableRawPointer.allocate(byteCount: shape.bytes.count, alignment: 64)
            shape.bytes.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: shape.bytes.count) }
            return UnsafeRawPointer(base)
        }
        defer { for base in weights { UnsafeMutableRawPointer(mutating: base).deallocate() } }
        let width = shapes.map(\.rows).reduce(0, +) + 5  // every product's outputs side by side, and a gap
        for tokens in [1, 6] {
            let x = ActivationBatch(columns: length, capacity: tokens)
            x.setCount(tokens)
            for t in 0..<tokens { for i in 0..<length { x.row(t)[i] = g.next() * 2 } }
            var results: [Int: [Float]] = [:]
            for threads in [1, 2, 3, 8] {
                var out = [Float](repeating: .nan, count: tokens * width)
                out.withUnsafeMutableBufferPointer { o in
                    var column = 0
                    let products = zip(shapes, weights).map { shape, base in
                        defer { column += shape.rows }
                        return MatMul.Product(
                            weights: WeightMatrix(
                                name: "\(shape.layout) \(shape.dtype)", base: base, dtype: shape.dtype, rows: shape.rows, columns: length,
                                layout: shape.layout),
                            output: o.baseAddress! + column, stride: width)
                    }
                    products.withUnsafeBufferPointer { p in DotKernels.with(set) { MatMul.multiply(p, x, threads: threads) } }
                }
                for t in 0..<tokens {
                    let row = out[t * width..<(t + 1) * width]
                    #expect(row.prefix(width - 5).allSatisfy { !$0.isNaN }, "\(set), \(threads) threads: an output was not written")
                    #expect(row.suffix(5).allSatisfy { $0.isNaN }, "\(set), \(threads) threads: wrote beside the outputs")
                }
                results[threads] = out
            }
            for threads in [2, 3, 8] {
                #expect(
                    zip(results[1]!, results[threads]!).allSatisfy { $0.bitPattern == $1.bitPattern },
                    "\(set), \(tokens) tokens: \(threads) threads differ from one")
            }
        }
    }

    /// Adding many scaled Q4_0 rows at once (the active neurons of a down matrix) equals adding
    /// them one by one with the scalar reference, for counts that do and do not fill the groups
    /// of four, and rows longer than the 21B width's (81 blocks).
    @Test(arguments: sets)
    func addingManyRowsMatchesTheReference(set: DotKernels.InstructionSet) {
        let k = table(set)
        for (length, count) in [(32, 1), (96, 4), (1536, 11), (2592, 6)] {
            var g = Generator(state: 13 + UInt64(length * count))
            let rows = 2 * count + 1
            let matrix = (0..<rows).flatMap { _ in encoded((0..<length).map { _ in g.next() }, .q4_0) }
            let rowBytes = matrix.count / rows
            let chosen = (0..<count).map { Int32(2 * $0 + 1) }
            let coefficients = (0..<count).map { _ in g.next() * 2 }
            let start = (0..<length).map { _ in g.next() }
            var fast = start, reference = start
            matrix.withUnsafeBytes { m in
                // With and without a range to prefetch alongside (it must not change the sums).
                let next = length == 96 ? nil : m.baseAddress
                k.axpy_rows_q4_0(
                    m.baseAddress!, Int32(rowBytes), chosen, coefficients, Int32(count), &fast, Int32(length), next, Int32(m.count))
                reference.withUnsafeMutableBufferPointer { y in
                    for (r, c) in zip(chosen, coefficients) {
                        ReferenceKernels.addScaledRow(
                            m.baseAddress! + Int(r) * rowBytes, dtype: .q4_0, scale: c, into: y.baseAddress!, length)
                    }
                }
            }
            #expect(
                zip(fast, reference).allSatisfy { abs($0 - $1) <= 1e-5 * (abs($1) + 1) },
                "\(set) n=\(length): max diff \(zip(fast, reference).map { abs($0 - $1) }.max()!)")
        }
    }

    /// Two tokens' down rows in one pass (their lists merged, shared rows unpacked once) equal
    /// each token's rows added one by one with the scalar reference: lists that overlap, that
    /// do not, and one that is empty; at the 21B width, 101 shared rows (the AVX2 integer form's
    /// chunks of 50 rows and an odd one at the end). The AVX2 integer form (rows of whole eights
    /// of blocks) rounds each shared row's c · d to half a step of 1/32767 of the largest |c · d|
    /// at that block, a term's error at most 8 half steps: it is held to that bound summed over
    /// the shared rows, the float forms to float rounding.
    @Test(arguments: sets)
    func addingTwoTokensRowsMatchesTheReference(set: DotKernels.InstructionSet) {
        for (length, rows, picks) in [
            (32, 3, [[0, 2], [1, 2]]), (1536, 40, [[1, 3, 4, 9, 17, 30, 31, 39], [0, 3, 9, 10, 11, 12, 17, 38, 39]]),
            (96, 9, [[], [2, 5, 8]]), (256, 12, [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11]]),
            (2560, 160, [Array(0..<120).filter { $0 % 7 != 3 }, Array(15..<140).filter { $0 % 5 != 1 }])
        ] {
            var g = Generator(state: 31 + UInt64(length * rows))
            let matrix = (0..<rows).flatMap { _ in encoded((0..<length).map { _ in g.next() }, .q4_0) }
            let rowBytes = matrix.count / rows
            let lists = picks.map { $0.map(Int32.init) }
            let coefficients = lists.map { $0.map { _ in g.next() * 2 } }
            let starts = (0..<2).map { _ in (0..<length).map { _ in g.next() } }
            var fast0 = starts[0], fast1 = starts[1], reference = starts
            var merged = [Int32](repeating: 0, count: lists[0].count + lists[1].count)
            var m0 = [Float](repeating: .nan, count: merged.count), m1 = m0
            matrix.withUnsafeBytes { m in
                DotKernels.with(set) {
                    st_axpy_rows_q4_0_pair(
                        m.baseAddress!, Int32(rowBytes), lists[0], coefficients[0], Int32(lists[0].count), lists[1], coefficients[1],
                        Int32(lists[1].count), &fast0, &fast1, Int32(length), &merged, &m0, &m1)
                }
                for t in 0..<2 {
                    reference[t].withUnsafeMutableBufferPointer { y in
                        for (r, c) in zip(lists[t], coefficients[t]) {
                            ReferenceKernels.addScaledRow(
                                m.baseAddress! + Int(r) * rowBytes, dtype: .q4_0, scale: c, into: y.baseAddress!, length)
                        }
                    }
                }
            }
            // The integer form's bound per block: shared rows × 8 half steps of the largest |c · d|.
            let shared = Set(lists[0]).intersection(lists[1])
            var allowance = [Float](repeating: 0, count: length / 32)
            if set == .avx2 && length % 256 == 0 {
                for b in 0..<length / 32 {
                    var largest: Float = 0
                    for (t, list) in lists.enumerated() {
                        for (r, c) in zip(list, coefficients[t]) where shared.contains(r) {
                            let d = matrix.withUnsafeBytes {
                                $0.loadUnaligned(fromByteOffset: Int(r) * rowBytes + b * TensorDType.q4_0.blockBytes, as: Float16.self)
                            }
                            largest = max(largest, abs(c * Float(d)))
                        }
                    }
                    allowance[b] = Float(shared.count) * 8 * 0.5 * largest / 32767
                }
            }
            for (t, fast) in [fast0, fast1].enumerated() {
                // How far each output is beyond what it may differ by (at most 0 to pass).
                let beyond = (0..<length).map { (i: Int) -> Float in
                    let bound: Float = 1e-5 * (abs(reference[t][i]) + 1) + allowance[i / 32]
                    return abs(fast[i] - reference[t][i]) - bound
                }
                #expect(beyond.allSatisfy { $0 <= 0 }, "\(set) n=\(length) token \(t): \(beyond.max()!) beyond the bound")
            }
        }
    }

    /// A KV cache row as stored, in the Format library's codecs: float16 rounds to nearest even
    /// (Swift's own conversion), q8_0 is ggml's block (Format's `Q8_0`, checked against ggml's
    /// quantiser in QuantizationTests).
    func storedRow(_ x: [Float], _ type: KVCacheType) -> [UInt8] {
        switch type {
        case .f32: encoded(x, .f32)
        case .f16: encoded(x, .f16)
        case .q8_0: encoded(x, .q8_0)
        }
    }

    func dtype(_ type: KVCacheType) -> TensorDType {
        switch type {
        case .f32: .f32
        case .f16: .f16
        case .q8_0: .q8_0
        }
    }

    /// st_kv_store writes exactly those bytes (the same on every tier: storing is not
    /// dispatched), st_kv_load reads them back as the codecs decode them, and the row sizes are
    /// llama.cpp's (4, 2 and 34/32 bytes a value).
    @Test(arguments: KVCacheType.allCases)
    func kvRowsAreStoredAsTheCodecsStoreThem(type: KVCacheType) {
        var g = Generator(state: 77)
        for headDim in [32, 64, 128, 256] {
            for spread: Float in [1, 1e-3, 3e4, 1e-6] {
                var x = (0..<headDim).map { _ in g.next() * spread }
                x[0] = 0
                if headDim > 32 { x[1] = 65519 * (spread > 1 ? 1 : 0); x[2] = -x[1] }  // float16's rounding edge
                var row = [UInt8](repeating: 0xAA, count: type.rowBytes(headDim: headDim)!)
                st_kv_store(type.code, x, &row, Int32(headDim))
                #expect(row == storedRow(x, type), "\(type) d=\(headDim) spread \(spread)")
                var back = [Float](repeating: .nan, count: headDim)
                st_kv_load(type.code, row, &back, Int32(headDim))
                var expected = [Float](repeating: 0, count: headDim)
                row.withUnsafeBytes { TensorCodec.decode($0.baseAddress!, dtype: dtype(type), count: headDim, into: &expected) }
                #expect(back == expected, "\(type) d=\(headDim) spread \(spread)")
            }
        }
        #expect(KVCacheType.f32.rowBytes(headDim: 128) == 512 && KVCacheType.f16.rowBytes(headDim: 128) == 256)
        #expect(KVCacheType.q8_0.rowBytes(headDim: 128) == 136 && KVCacheType.q8_0.rowBytes(headDim: 16) == nil)
        // Every float16 value's neighbourhood: halfway cases round to even, and the first
        // value past the largest finite float16 goes to infinity.
        for bits in stride(from: UInt16(0), to: 0x7C00, by: 7) {
            let value = Float(Float16(bitPattern: bits)), next = Float(Float16(bitPattern: bits + 1))
            for x in [value, (value + next) / 2, value.nextUp, ((value + next) / 2).nextDown, -value] {
                var h: UInt16 = 0
                st_kv_store(KVCacheType.f16.code, [x] + [Float](repeating: 0, count: 31), &h, 1)
                #expect(h == Float16(x).bitPattern, "\(x)")
            }
        }
    }

    /// Attention for a tile of queries (tokens × the heads sharing a key/value head) over a KV
    /// cache of each type, against a plain two-pass softmax in double precision over the values
    /// the cache holds: head sizes on and off the vector width, groups of 1 to 7, tiles of 1 to
    /// 21 tokens, a ring that wraps, sliding windows narrower and wider than a block, one
    /// position, and scores that keep rising (every block rescales the running sums) or span a
    /// wide range.
    @Test(arguments: sets, KVCacheType.allCases)
    func attentionMatchesATwoPassSoftmax(set: DotKernels.InstructionSet, type: KVCacheType) {
        let k = table(set)
        // (head_dim, heads, tokens, capacity, position, window (0: none), spread)
        for (headDim, heads, tokens, capacity, position, window, spread) in [
            (32, 1, 1, 10, 15, 9, Float(1)), (128, 6, 1, 40, 39, 0, 1), (128, 2, 1, 8, 3, 1, 1),
            (96, 3, 1, 12, 13, 12, 4), (256, 2, 3, 26, 22, 0, 1), (64, 7, 2, 60, 58, 0, 30),
            (128, 6, 1, 50, 77, 48, 3), (128, 6, 16, 64, 48, 0, 1), (128, 7, 21, 100, 30, 0, 2),
            (64, 4, 13, 40, 60, 7, 1), (128, 6, 16, 48, 100, 20, 1), (32, 2, 9, 9, 0, 0, 1), (128, 1, 5, 80, 3, 40, 1),
            (128, 7, 18, 150, 100, 64, 1), (16, 4, 3, 40, 20, 0, 1)
        ] {
            guard let rowBytes = type.rowBytes(headDim: headDim) else { continue }
            var g = Generator(state: UInt64(headDim * 31 + capacity + tokens))
            let q = (0..<tokens * heads * headDim).map { _ in g.next() * spread }
            var keyValues = (0..<capacity * headDim).map { _ in g.next() }, valueValues = keyValues.map { _ in g.next() }
            let last = position + tokens - 1
            let first = { (t: Int) in window > 0 ? max(0, position + t - window + 1) : 0 }
            if spread == 30 {  // rising scores for the first head: each key a larger multiple of its query
                for j in first(0)...last { for i in 0..<headDim { keyValues[(j % capacity) * headDim + i] = q[i] * Float(j) * 0.01 } }
            }
            var keys: [UInt8] = [], values: [UInt8] = []
            for slot in 0..<capacity {
                keys += storedRow(Array(keyValues[slot * headDim..<(slot + 1) * headDim]), type)
                values += storedRow(Array(valueValues[slot * headDim..<(slot + 1) * headDim]), type)
            }
            var heldKeys = [Float](repeating: 0, count: capacity * headDim), heldValues = heldKeys
            keys.withUnsafeBytes { TensorCodec.decode($0.baseAddress!, dtype: dtype(type), count: capacity * headDim, into: &heldKeys) }
            values.withUnsafeBytes {
                TensorCodec.decode($0.baseAddress!, dtype: dtype(type), count: capacity * headDim, into: &heldValues)
            }
            let stride = heads * headDim + 8  // queries and outputs of a token some slack apart, as batch rows
            var queries = [Float](repeating: 0, count: tokens * stride)
            for t in 0..<tokens { for i in 0..<heads * headDim { queries[t * stride + i] = q[t * heads * headDim + i] } }
            var out = [Float](repeating: .nan, count: tokens * stride)
            let scale = 1 / Float(headDim).squareRoot()
            k.attend(
                queries, Int32(stride), Int32(tokens), Int32(heads), keys, values, type.code, Int32(capacity), Int32(rowBytes),
                Int32(position), Int32(window), Int32(headDim), scale, &out, Int32(stride))
            for t in 0..<tokens {
                for i in heads * headDim..<stride { #expect(out[t * stride + i].isNaN, "wrote past token \(t)'s heads") }
                for h in 0..<heads {
                    let range = first(t)...(position + t)
                    var scores: [Double] = []
                    for j in range {
                        let base = (j % capacity) * headDim
                        scores.append(
                            (0..<headDim).reduce(0.0) { $0 + Double(queries[t * stride + h * headDim + $1]) * Double(heldKeys[base + $1]) }
                                * Double(scale))
                    }
                    let top = scores.max()!
                    let weights = scores.map { Foundation.exp($0 - top) }, total = weights.reduce(0, +)
                    for i in 0..<headDim {
                        var expected = 0.0
                        for (n, j) in range.enumerated() {
                            expected += weights[n] / total * Double(heldValues[(j % capacity) * headDim + i])
                        }
                        let got = out[t * stride + h * headDim + i]
                        #expect(
                            abs(Double(got) - expected) <= 2e-5 * (abs(expected) + 1),
                            "\(set) \(type) d=\(headDim) token \(t) head \(h) \(range) element \(i): \(got) vs \(expected)")
                    }
                }
            }
        }
    }

    @Test(arguments: sets, [TensorDType.f32, .bf16, .f16, .q4_0, .q8_0])
    func addScaledRowMatchesTheReference(set: DotKernels.InstructionSet, dtype: TensorDType) {
        let k = table(set)
        for length in [32, 96, 1536] {
            var g = Generator(state: 5 + UInt64(length))
            let w = (0..<length).map { _ in g.next() }
            let start = (0..<length).map { _ in g.next() }
            let row = encoded(w, dtype)
            var fast = start, reference = start
            row.withUnsafeBytes { r in
                let p = r.baseAddress!
                fast.withUnsafeMutableBufferPointer { y in
                    let n = Int32(length), out = y.baseAddress!
                    switch dtype {
                    case .f32: k.axpy_f32(p.assumingMemoryBound(to: Float.self), -0.37, out, n)
                    case .bf16: k.axpy_bf16(p.assumingMemoryBound(to: UInt16.self), -0.37, out, n)
                    case .f16: k.axpy_f16(p.assumingMemoryBound(to: UInt16.self), -0.37, out, n)
                    case .q4_0: k.axpy_q4_0(p, -0.37, out, n)
                    case .q8_0: k.axpy_q8_0(p, -0.37, out, n)
                    }
                }
                reference.withUnsafeMutableBufferPointer {
                    ReferenceKernels.addScaledRow(p, dtype: dtype, scale: -0.37, into: $0.baseAddress!, length)
                }
            }
            #expect(
                zip(fast, reference).allSatisfy { abs($0 - $1) <= 1e-6 },
                "\(set) \(dtype): max diff \(zip(fast, reference).map { abs($0 - $1) }.max()!)")
        }
    }

    @Test(arguments: sets)
    func activationQuantisationMatchesTheQ8_0Codec(set: DotKernels.InstructionSet) {
        var g = Generator(state: 11)
        var x = (0..<1536).map { _ in g.next() * 5 }
        x[3] = 0; x[40] = 2.5 * x[32..<64].map(abs).max()! / 127  // a half step lands on .5
        // Block 2: exact halves both ways (amax 127 makes d = 1), and values just below a half.
        for j in 0..<32 { x[64 + j] = [Float(0.5), -0.5, 1.5, -2.5, 126.5, 0.49999997, -0.49999997, 3.5][j % 8] }
        x[64] = 127
        for j in 96..<128 { x[j] = 0 }  // an all-zero block
        let blockCount = x.count / 32
        var scales = [Float](repeating: 0, count: blockCount)
        var values = [Int8](repeating: 0, count: x.count)
        var sums = [Int32](repeating: 0, count: blockCount)
        table(set).quantize_q8_0(x, &scales, &values, &sums, Int32(x.count))
        let blocks = encoded(x, .q8_0)
        for b in 0..<blockCount {
            #expect(sums[b] == values[b * 32..<(b + 1) * 32].reduce(Int32(0)) { $0 + Int32($1) })
            let d = blocks.withUnsafeBytes { Float(Float16(bitPattern: $0.loadUnaligned(fromByteOffset: b * 34, as: UInt16.self))) }
            #expect(abs(scales[b] - d) <= d * 1e-3, "scale kept in float32, ggml rounds it to float16")
            for j in 0..<32 { #expect(values[b * 32 + j] == Int8(bitPattern: blocks[b * 34 + 2 + j])) }
        }
    }
}

@Suite struct ActivationBatchTests {
    /// Rows gathered from a quantised batch carry its Q8_0 form, byte for byte what quantising
    /// them again would give.
    /// RMSNorm's C helper against the formula in double precision, on lengths that do and do
    /// not fill its eight lanes; adding rows keeps the order of the sums exactly.
    @Test func normAndRowSumsMatchTheirDefinitions() {
        var g = KernelTests.Generator(state: 23)
        for n in [1, 7, 64, 1536, 2563] {
            let x = (0..<n).map { _ in g.next() * 3 }, w = (0..<n).map { _ in 1 + g.next() / 4 }
            var out = [Float](repeating: .nan, count: n)
            let r = st_rms_norm(x, w, 1e-6, &out, Int32(n))
            var sum = 0.0
            for v in x { sum += Double(v) * Double(v) }
            let expected = 1 / (sum / Double(n) + 1e-6).squareRoot()
            #expect(abs(Double(r) - expected) <= 1e-6 * expected, "n=\(n)")
            #expect((0..<n).allSatisfy { out[$0] == w[$0] * (x[$0] * r) }, "n=\(n)")
        }
        let rows = (0..<3 * 40).map { _ in g.next() }
        var y = (0..<37).map { _ in g.next() }, expected = y
        for k in 0..<3 { for i in 0..<37 { expected[i] += rows[k * 40 + i] } }
        st_add_rows(&y, rows, 3, 40, 37)
        #expect(y == expected)
    }

    @Test func appendedRowsKeepTheSourceQuantisation() {
        var g = KernelTests.Generator(state: 17)
        let n = 256, blocks = n / 32
        let source = ActivationBatch(columns: n, capacity: 4)
        source.setCount(4)
        for r in 0..<4 { for i in 0..<n { source.row(r)[i] = g.next() * 3 } }
        _ = source.quantizedForm()
        let gathered = ActivationBatch(columns: n, capacity: 4)
        gathered.setCount(0)
        for r in [2, 0, 3] { gathered.append(row: r, of: source) }
        let copied = gathered.quantizedForm()
        let fresh = ActivationBatch(columns: n, capacity: 4)
        fresh.setCount(3)
        for (i, r) in [2, 0, 3].enumerated() { fresh.row(i).update(from: source.row(r), count: n) }
        let requantised = fresh.quantizedForm()
        #expect(
            Array(UnsafeBufferPointer(start: copied.values, count: 3 * n))
                == Array(UnsafeBufferPointer(start: requantised.values, count: 3 * n)))
        #expect(
            Array(UnsafeBufferPointer(start: copied.interleaved!, count: 3 * n))
                == Array(UnsafeBufferPointer(start: requantised.interleaved!, count: 3 * n)))
        #expect(
            Array(UnsafeBufferPointer(start: copied.scales, count: 3 * blocks))
                == Array(UnsafeBufferPointer(start: requantised.scales, count: 3 * blocks)))
        #expect(
            Array(UnsafeBufferPointer(start: copied.sums, count: 3 * blocks))
                == Array(UnsafeBufferPointer(start: requantised.sums, count: 3 * blocks)))
    }
}
