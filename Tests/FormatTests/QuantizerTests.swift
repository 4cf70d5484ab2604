import Foundation
import Testing
@testable import Format

/// stquant's library: policy, layout, error bounds against the float package, requantisation.
@Suite struct QuantizerTests {
    func quantize(
        _ package: String, _ policy: QuantizationPolicy, in scratch: ScratchDirectory, name: String
    ) throws -> (PackageReader, QuantizationReport) {
        let output = scratch.file(name)
        let plan = try Quantizer.plan(source: try PackageReader(path: package), policy: policy)
        let report = try Quantizer.write(plan, to: output, overwrite: false, threads: 2)
        return (try PackageReader(path: output), report)
    }

    func floats(_ reader: PackageReader, _ t: TensorEntry) -> [Float] {
        var out = [Float](repeating: .nan, count: t.elementCount)
        out.withUnsafeMutableBufferPointer { reader.decode(t, into: $0.baseAddress!) }
        return out
    }

    static let combinations = Fixtures.models.flatMap { m in [TensorDType.q4_0, .q8_0].map { (m, $0) } }

    @Test(arguments: combinations)
    func quantisedPackageVerifiesKeepsLayoutAndStaysWithinTheCodecBound(model: String, type: TensorDType) throws {
        let scratch = ScratchDirectory()
        let float = try PackageReader(path: try convertFixture(model, in: scratch))
        let (quantised, report) = try quantize(float.path, QuantizationPolicy(type: type), in: scratch, name: "q.stpk")
        try quantised.verify()
        checkStorageLayout(quantised)
        #expect(quantised.manifest.config == float.manifest.config)
        #expect(quantised.manifest.files.map(\.name) == float.manifest.files.map(\.name))
        for name in quantised.manifest.files.map(\.name) { #expect(quantised.fileContents(name) == float.fileContents(name)) }

        for t in quantised.manifest.tensors {
            let original = float.tensor(t.name)!
            let role = TensorNames.role(of: t.name)
            let a = floats(float, original), b = floats(quantised, t)
            #expect(t.shape == original.shape && t.layout.orientation == original.layout)
            // Q4_0 matrices in source orientation are arranged in row groups of eight; neuron-major down is not.
            let grouped = type == .q4_0 && t.dtype == .q4_0 && original.layout == .rowMajor && t.shape.count == 2
            #expect((t.layout == .rowMajorX8) == grouped, "\(t.name): \(t.layout.rawValue)")
            switch role {
            case .norm, .router:
                #expect(t.dtype == .f32, "\(t.name)")
                #expect(a == b, "\(t.name) kept exactly")
            default:
                #expect(t.dtype == type, "\(t.name)")
                for block in 0..<a.count / 32 {
                    let range = block * 32..<(block + 1) * 32
                    let amax = a[range].map(abs).max()!
                    let bound = type == .q4_0 ? Q4_0.errorBound(blockMaxMagnitude: amax) : Q8_0.errorBound(blockMaxMagnitude: amax)
                    let worst = range.map { abs(a[$0] - b[$0]) }.max()!
                    if worst > bound { Issue.record("\(t.name) block \(block): error \(worst) exceeds bound \(bound)"); break }
                }
            }
        }
        // The report agrees with what we measure: relative RMS error of the quantised kinds.
        for group in report.byRole() where group.role == .expert || group.role == .attention {
            if type == .q4_0 {
                #expect((0.05...0.12).contains(group.error.relativeRMSE), "\(group.role): \(group.error.relativeRMSE)")
            } else {
                #expect(group.error.relativeRMSE < 0.008, "\(group.role): \(group.error.relativeRMSE)")
            }
        }
        let quantisedBits =
            Double(report.tensors.filter { $0.to == type }.reduce(0) { $0 + $1.bytesAfter } * 8)
            / Double(report.tensors.filter { $0.to == type }.reduce(0) { $0 + $1.elements })
        #expect(quantisedBits == (type == .q4_0 ? 4.5 : 8.5))
        #expect(report.sizeAfter == quantised.header.fileLength && report.sizeBefore == float.header.fileLength)
    }

    /// `--plain-rows` stores the same Q4_0 blocks in ggml's row order; quantising either package
    /// to q4_0 again arranges the rows in groups or back without touching a block, so the round trip
    /// gives the first package back byte for byte, and both decode to the same values.
    @Test func plainAndGroupedRowsHoldTheSameBlocks() throws {
        let scratch = ScratchDirectory()
        let float = try convertFixture("tiny-21b-like", in: scratch)
        let (grouped, _) = try quantize(float, QuantizationPolicy(type: .q4_0), in: scratch, name: "x8.stpk")
        let (plain, _) = try quantize(float, QuantizationPolicy(type: .q4_0, groupedLayouts: false), in: scratch, name: "plain.stpk")
        let (rearranged, _) = try quantize(plain.path, QuantizationPolicy(type: .q4_0), in: scratch, name: "again.stpk")
        let (ungrouped, _) = try quantize(
            grouped.path, QuantizationPolicy(type: .q4_0, groupedLayouts: false), in: scratch, name: "back.stpk")
        try rearranged.verify()
        try ungrouped.verify()
        #expect(plain.manifest.tensors.allSatisfy { $0.layout != .rowMajorX8 })
        #expect(plain.manifest.provenance["quantization"]?.objectValue?["q4_0_rows"]?.stringValue == "row_major")
        var grouped2D = 0
        for t in grouped.manifest.tensors {
            let p = plain.tensor(t.name)!
            if t.layout == .rowMajorX8 {
                grouped2D += 1
                #expect(!grouped.bytes(of: t).elementsEqual(plain.bytes(of: p)), "\(t.name) is rearranged")
            }
            #expect(floats(grouped, t) == floats(plain, p), "\(t.name) decodes to the same values")
            #expect(rearranged.bytes(of: rearranged.tensor(t.name)!).elementsEqual(grouped.bytes(of: t)), "\(t.name): plain → grouped")
            #expect(ungrouped.bytes(of: ungrouped.tensor(t.name)!).elementsEqual(plain.bytes(of: p)), "\(t.name): grouped → plain")
        }
        #expect(grouped2D > 0)
    }

    /// Which layout each Q4_0 matrix gets: expert up rows of a multiple of 256 values keep their
    /// rows apart with blocks grouped (`row_major_b8`), narrower ones and other matrices in source
    /// orientation group rows in eights when the row count allows, the rest stay as they are.
    @Test func layoutsFollowTheRoleAndTheShape() {
        let policy = QuantizationPolicy(type: .q4_0)
        let up = "layers.3.experts.5.up", gate = "layers.3.experts.5.gate"
        #expect(policy.layout(name: up, dtype: .q4_0, shape: [768, 1536], orientation: .rowMajor) == .rowMajorB8)
        #expect(policy.layout(name: up, dtype: .q4_0, shape: [60, 256], orientation: .rowMajor) == .rowMajorB8)
        #expect(policy.layout(name: up, dtype: .q4_0, shape: [64, 96], orientation: .rowMajor) == .rowMajorX8)
        #expect(policy.layout(name: up, dtype: .q4_0, shape: [60, 96], orientation: .rowMajor) == .rowMajor)
        #expect(policy.layout(name: up, dtype: .q8_0, shape: [768, 1536], orientation: .rowMajor) == .rowMajor)
        #expect(policy.layout(name: gate, dtype: .q4_0, shape: [768, 1536], orientation: .rowMajor) == .rowMajorX8)
        #expect(policy.layout(name: "layers.3.attn_q", dtype: .q4_0, shape: [1536, 1536], orientation: .rowMajor) == .rowMajorX8)
        #expect(policy.layout(name: "layers.3.experts.5.down", dtype: .q4_0, shape: [768, 1536], orientation: .transposed) == .transposed)
        #expect(
            QuantizationPolicy(type: .q4_0, groupedLayouts: false).layout(
                name: up, dtype: .q4_0, shape: [768, 1536], orientation: .rowMajor) == .rowMajor)
    }

    /// Both grouped layouts hold a matrix's bytes in place of its rows and give them back.
    @Test(arguments: [TensorLayout.rowMajorX8, .rowMajorB8])
    func groupedLayoutsRoundTrip(layout: TensorLayout) {
        let rows = 16, rowBytes = 8 * 18 * 2
        let plain = (0..<rows * rowBytes).map { UInt8(truncatingIfNeeded: $0 &* 2654435761 >> 7) }
        var packed = [UInt8](repeating: 0, count: plain.count), back = packed
        #expect(layout.fits(dtype: .q4_0, rows: rows, rowBytes: rowBytes) && !layout.fits(dtype: .q8_0, rows: rows, rowBytes: rowBytes))
        plain.withUnsafeBytes { p in
            packed.withUnsafeMutableBytes {
                layout.arrange(plain: p.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: rows)
            }
        }
        packed.withUnsafeBytes { p in
            back.withUnsafeMutableBytes { layout.plainRows(p.baseAddress!, into: $0.baseAddress!, rowBytes: rowBytes, rowCount: rows) }
        }
        #expect(packed != plain && packed.sorted() == plain.sorted())
        #expect(back == plain)
        if layout == .rowMajorB8 {
            // Rows stay where they were: each row's bytes are a permutation of its own.
            for r in 0..<rows {
                #expect(packed[r * rowBytes..<(r + 1) * rowBytes].sorted() == plain[r * rowBytes..<(r + 1) * rowBytes].sorted())
            }
        }
    }

    @Test func alreadyQuantisedTensorsAreRefusedUnlessAllowed() throws {
        let scratch = ScratchDirectory()
        let float = try convertFixture("tiny-4b-like", in: scratch)
        let (q8, _) = try quantize(float, QuantizationPolicy(type: .q8_0), in: scratch, name: "q8.stpk")
        #expect {
            _ = try Quantizer.plan(source: q8, policy: QuantizationPolicy(type: .q4_0))
        } throws: { error in
            guard case .invalidRequest(let message) = error as? FormatError else { return false }
            return message.contains("already q8_0") && message.contains("--allow-requantize")
        }
        let (q4, _) = try quantize(q8.path, QuantizationPolicy(type: .q4_0, allowRequantize: true), in: scratch, name: "q4.stpk")
        try q4.verify()
        #expect(q4.tensor("layers.1.attn_q")!.dtype == .q4_0)
        // Same type again: nothing to re-quantise, the bytes are copied unchanged.
        let (again, _) = try quantize(q8.path, QuantizationPolicy(type: .q8_0), in: scratch, name: "again.stpk")
        for t in again.manifest.tensors { #expect(again.bytes(of: t).elementsEqual(q8.bytes(of: q8.tensor(t.name)!)), "\(t.name)") }
    }

    @Test func overridesChooseTypesPerTensorAndForTheEmbedding() throws {
        let scratch = ScratchDirectory()
        let float = try convertFixture("tiny-untied", in: scratch)
        let policy = QuantizationPolicy(
            type: .q4_0, embeddingType: .q8_0, outputType: .f16,
            overrides: [("layers.*.attn_v", .q8_0), ("layers.2.experts.*", .f32)])
        let (q, _) = try quantize(float, policy, in: scratch, name: "q.stpk")
        #expect(q.tensor("token_embd")!.dtype == .q8_0)
        #expect(q.tensor("output")!.dtype == .f16)
        #expect(q.tensor("layers.3.attn_v")!.dtype == .q8_0)
        #expect(q.tensor("layers.3.attn_k")!.dtype == .q4_0)
        #expect(q.tensor("layers.2.experts.5.down")!.dtype == .f32)
        #expect(q.tensor("layers.1.experts.5.down")!.dtype == .q4_0)
        checkStorageLayout(q)
        #expect(q.manifest.provenance["quantization"]?.objectValue?["tensor_types"]?.arrayValue?.count == 2)
    }

    @Test func rowsThatDoNotSplitIntoBlocksFallBackToFloat16() {
        let policy = QuantizationPolicy(type: .q4_0)
        let odd = TensorEntry(name: "layers.0.attn_output", sourceName: "x", dtype: .bf16, shape: [96, 48], layout: .rowMajor)
        let decision = policy.decide(odd)
        #expect(decision.dtype == .f16 && decision.fellBack)
        #expect(decision.reason.contains("48"))
        let even = TensorEntry(name: "layers.0.attn_output", sourceName: "x", dtype: .bf16, shape: [48, 96], layout: .rowMajor)
        #expect(policy.decide(even) == .init(dtype: .q4_0, reason: "default", fellBack: false))
    }

    @Test(arguments: [
        ("layers.*.attn_v", "layers.12.attn_v", true), ("layers.*.attn_v", "layers.12.attn_v2", false),
        ("*", "token_embd", true), ("token_embd", "token_embd", true), ("layers.1.*", "layers.12.attn_q", false),
        ("*experts*down", "layers.3.experts.7.down", true), ("a*b*c", "abbbc", true), ("a*b*c", "acb", false)
    ])
    func globMatchesWholeNames(pattern: String, name: String, matches: Bool) {
        #expect(QuantizationPolicy.glob(pattern, matches: name) == matches)
    }

    @Test func overrideParsingRejectsUnknownTypes() throws {
        #expect(try QuantizationPolicy.parseOverride("layers.*.attn_v=Q8_0") == ("layers.*.attn_v", .q8_0))
        #expect(throws: FormatError.self) { try QuantizationPolicy.parseOverride("layers.*.attn_v=q5_k") }
        #expect(throws: FormatError.self) { try QuantizationPolicy.parseOverride("=q8_0") }
    }

    @Test func threadCountDoesNotChangeTheBytes() throws {
        let scratch = ScratchDirectory()
        let float = try PackageReader(path: try convertFixture("tiny-21b-like", in: scratch))
        let plan = try Quantizer.plan(source: float, policy: QuantizationPolicy(type: .q4_0))
        try Quantizer.write(plan, to: scratch.file("one.stpk"), overwrite: false, threads: 1)
        try Quantizer.write(plan, to: scratch.file("three.stpk"), overwrite: false, threads: 3)
        #expect(
            try Data(contentsOf: URL(fileURLWithPath: scratch.file("one.stpk")))
                == Data(contentsOf: URL(fileURLWithPath: scratch.file("three.stpk"))))
    }
}
