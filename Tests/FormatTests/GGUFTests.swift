import Foundation
import Testing
@testable import Format

/// GGUF both ways: a package exported and imported again is the package (bit for bit for float
/// types; for quantised ones, every block but the requantised down matrices'), and every way a
/// GGUF can be wrong is its own error, with no output.
@Suite struct GGUFTests {
    static func roundTrip(
        _ package: String, in scratch: ScratchDirectory, dtype: TensorDType? = nil
    ) throws -> (PackageReader, PackageReader, GGUFImport.Plan) {
        let source = try PackageReader(path: package)
        let gguf = scratch.file(UUID().uuidString + ".gguf"), back = scratch.file(UUID().uuidString + ".stpk")
        try GGUFExport.write(try GGUFExport.plan(package: source, dtype: dtype, forceLayout: true), to: gguf, overwrite: false)
        let plan = try GGUFImport.plan(try GGUFFile(path: gguf))
        try GGUFImport.write(plan, to: back, overwrite: false)
        let imported = try PackageReader(path: back)
        try imported.verify()
        return (source, imported, plan)
    }

    @Test(arguments: Fixtures.models, [TensorDType.f32, .f16, .bf16])
    func floatPackagesComeBackBitForBit(model: String, dtype: TensorDType) throws {
        let scratch = ScratchDirectory()
        let (a, b, _) = try Self.roundTrip(try convertFixture(model, in: scratch, dtype: dtype == .bf16 ? nil : dtype), in: scratch)
        #expect(a.manifest.config == b.manifest.config)
        #expect(a.manifest.tensors.map(\.name) == b.manifest.tensors.map(\.name))
        for t in a.manifest.tensors {
            let u = try #require(b.tensor(t.name))
            #expect(t.dtype == u.dtype && t.shape == u.shape && t.layout == u.layout, "\(t.name)")
            #expect(a.bytes(of: t).elementsEqual(b.bytes(of: u)), "\(t.name) differs")
        }
    }

    /// Quantised packages: every tensor but the expert down matrices comes back bit for bit
    /// (grouped layouts included); the down matrices, requantised twice, stay within two
    /// quantisation steps of the original values.
    @Test(arguments: [TensorDType.q4_0, .q8_0])
    func quantisedPackagesChangeOnlyTheDownMatrices(type: TensorDType) throws {
        let scratch = ScratchDirectory()
        let float = try convertFixture("tiny-4b-like", in: scratch, dtype: .f32)
        let quantized = scratch.file("q.stpk")
        try Quantizer.write(
            try Quantizer.plan(source: try PackageReader(path: float), policy: QuantizationPolicy(type: type)), to: quantized,
            overwrite: false, threads: 2)
        let (a, b, plan) = try Self.roundTrip(quantized, in: scratch)
        #expect(plan.notes.contains { $0.contains("requantised the expert down matrices") })
        for t in a.manifest.tensors {
            let u = try #require(b.tensor(t.name))
            #expect(t.dtype == u.dtype && t.layout == u.layout, "\(t.name)")
            guard t.name.hasSuffix(".down") else {
                #expect(a.bytes(of: t).elementsEqual(b.bytes(of: u)), "\(t.name) differs")
                continue
            }
            var x = [Float](repeating: 0, count: t.elementCount), y = x
            x.withUnsafeMutableBufferPointer { a.decode(t, into: $0.baseAddress!) }
            y.withUnsafeMutableBufferPointer { b.decode(u, into: $0.baseAddress!) }
            let amax = x.map(abs).max()!, step = amax / (type == .q4_0 ? 8 : 127)
            let worst = zip(x, y).map { abs($0 - $1) }.max()!
            #expect(worst <= 2 * step, "\(t.name): off by \(worst), step \(step)")
        }
    }

    /// A GGUF whose down matrices are neuron-major already ([hidden, ffn, experts], as the
    /// authors' PowerInfer converter can write them) is imported without requantising: a Q4_0
    /// package comes back bit for bit, down matrices included.
    @Test func neuronMajorDownMatricesAreCopied() throws {
        let scratch = ScratchDirectory()
        let float = try convertFixture("tiny-4b-like", in: scratch, dtype: .f32)
        let quantized = scratch.file("q.stpk"), gguf = scratch.file("p.gguf"), back = scratch.file("back.stpk")
        try Quantizer.write(
            try Quantizer.plan(source: try PackageReader(path: float), policy: QuantizationPolicy(type: .q4_0)), to: quantized,
            overwrite: false,
            threads: 2)
        let a = try PackageReader(path: quantized)
        try GGUFExport.write(
            try GGUFExport.plan(package: a, dtype: nil, forceLayout: false, neuronMajorDown: true), to: gguf, overwrite: false)
        let plan = try GGUFImport.plan(try GGUFFile(path: gguf))
        #expect(plan.notes.contains { $0.contains("neuron-major already") } && !plan.notes.contains { $0.contains("requantised") })
        try GGUFImport.write(plan, to: back, overwrite: false)
        let b = try PackageReader(path: back)
        for t in a.manifest.tensors { #expect(a.bytes(of: t).elementsEqual(b.bytes(of: b.tensor(t.name)!)), "\(t.name)") }
    }

    /// A float package exported as Q4_0 holds, for every matrix llama-quantize quantises, ggml's
    /// blocks of the values in llama.cpp's orientation (the down matrices transposed first).
    @Test func exportQuantisesWhatLlamaQuantizeQuantises() throws {
        let scratch = ScratchDirectory()
        let float = try PackageReader(path: try convertFixture("tiny-untied", in: scratch, dtype: .f32))
        let path = scratch.file("q.gguf")
        try GGUFExport.write(try GGUFExport.plan(package: float, dtype: .q4_0, forceLayout: false), to: path, overwrite: false)
        let gguf = try GGUFFile(path: path)
        let c = float.manifest.config
        for t in gguf.tensors {
            let norm = t.dimensions.count == 1, router = t.name.hasSuffix("ffn_gate_inp.weight")
            #expect(t.type == (norm || router ? .f32 : .q4_0), "\(t.name) is \(t.type)")
        }
        let down = try #require(gguf.tensor("blk.1.ffn_down_exps.weight"))
        let e = float.tensor(TensorNames.expertDown(1, 3))!
        var values = [Float](repeating: 0, count: e.elementCount), hiddenMajor = values
        values.withUnsafeMutableBufferPointer { float.decode(e, into: $0.baseAddress!) }
        for j in 0..<c.expertFFNSize { for i in 0..<c.hiddenSize { hiddenMajor[i * c.expertFFNSize + j] = values[j * c.hiddenSize + i] } }
        var expected = [UInt8](repeating: 0, count: e.elementCount / 32 * 18)
        hiddenMajor.withUnsafeBufferPointer { v in
            expected.withUnsafeMutableBytes { Q4_0.quantize(v.baseAddress!, count: v.count, into: $0.baseAddress!) }
        }
        let slice = down.length / c.expertCount
        #expect(gguf.bytes(of: down)[3 * slice..<4 * slice].elementsEqual(expected))
    }

    @Test func layoutsLlamaCppCannotRunAreRefusedUnlessForced() throws {
        let scratch = ScratchDirectory()
        let package = try PackageReader(path: try convertFixture("tiny-21b-like", in: scratch))
        #expect(GGUFModel.unsupportedLayout(package.manifest.config) != nil)
        #expect {
            try GGUFExport.plan(package: package, dtype: nil, forceLayout: false)
        } throws: { error in
            "\(error)".contains("--force-layout") && "\(error)".contains("llama.cpp")
        }
        _ = try GGUFExport.plan(package: package, dtype: nil, forceLayout: true)
    }

    // MARK: Corrupt files

    /// A small GGUF written by hand (independently of GGUFWriter): two f32 tensors of 8 values.
    struct Builder {
        var version: UInt32 = 3
        var tensorCount: UInt64? = nil
        var keyCount: UInt64? = nil
        var metadata: [(String, UInt32, Data)] = [("general.architecture", 8, Builder.string("smallthinker"))]
        var tensors: [(name: String, dims: [UInt64], type: UInt32, offset: UInt64)] = [("a", [8], 0, 0), ("b", [8], 0, 32)]
        var dataBytes = 64
        var magic = Data("GGUF".utf8)

        static func u32(_ v: UInt32) -> Data { withUnsafeBytes(of: v.littleEndian) { Data($0) } }
        static func u64(_ v: UInt64) -> Data { withUnsafeBytes(of: v.littleEndian) { Data($0) } }
        static func string(_ s: String) -> Data { u64(UInt64(s.utf8.count)) + Data(s.utf8) }

        func bytes() -> Data {
            var d =
                magic + Builder.u32(version) + Builder.u64(tensorCount ?? UInt64(tensors.count))
                + Builder.u64(keyCount ?? UInt64(metadata.count))
            for (key, type, value) in metadata { d += Builder.string(key) + Builder.u32(type) + value }
            for t in tensors {
                d += Builder.string(t.name) + Builder.u32(UInt32(t.dims.count))
                for x in t.dims { d += Builder.u64(x) }
                d += Builder.u32(t.type) + Builder.u64(t.offset)
            }
            d += Data(count: (32 - d.count % 32) % 32)
            return d + Data(count: dataBytes)
        }
    }

    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let defect: GGUFDefect
        let build: @Sendable (inout Builder) -> Void
        var testDescription: String { name }
    }

    static let cases: [Case] = [
        Case(name: "bad magic", defect: .notGGUF) { $0.magic = Data("GGUG".utf8) },
        Case(name: "version 2", defect: .unsupportedVersion) { $0.version = 2 },
        Case(name: "absurd tensor count", defect: .absurdCount) { $0.tensorCount = 1 << 40 },
        Case(name: "absurd metadata count", defect: .absurdCount) { $0.keyCount = 1 << 33 },
        Case(name: "key string past the end", defect: .stringPastEnd) {
            $0.metadata = [("x", 8, Builder.u64(1 << 20))]; $0.tensors = []; $0.dataBytes = 0
        },
        Case(name: "unknown value type", defect: .unknownValueType) { $0.metadata.append(("general.x", 13, Data())) },
        Case(name: "array of an unknown type", defect: .unknownValueType) {
            $0.metadata.append(("general.x", 9, Builder.u32(99) + Builder.u64(1)))
        },
        Case(name: "array longer than the file", defect: .absurdCount) {
            $0.metadata.append(("general.x", 9, Builder.u32(4) + Builder.u64(1 << 40)))
        },
        Case(name: "bool of 2", defect: .invalidValue) { $0.metadata.append(("general.x", 7, Data([2]))) },
        Case(name: "key defined twice", defect: .duplicate) { $0.metadata.append(("general.architecture", 8, Builder.string("x"))) },
        Case(name: "alignment not a power of two", defect: .invalidValue) { $0.metadata.append(("general.alignment", 4, Builder.u32(48))) },
        Case(name: "tensor named twice", defect: .duplicate) { $0.tensors[1].name = "a" },
        Case(name: "five dimensions", defect: .badDimensions) { $0.tensors[0].dims = [1, 1, 1, 1, 8] },
        Case(name: "zero dimension", defect: .badDimensions) { $0.tensors[0].dims = [8, 0] },
        Case(name: "q4_0 rows not whole blocks", defect: .badDimensions) { $0.tensors[0] = ("a", [16], 2, 0) },
        Case(name: "iq2_xxs tensor", defect: .unsupportedTensorType) { $0.tensors[0].type = 16 },
        Case(name: "q4_K rows not whole super-blocks", defect: .badDimensions) { $0.tensors[0].type = 12 },
        Case(name: "misaligned tensor", defect: .misaligned) { $0.tensors[1].offset = 36 },
        Case(name: "overlapping tensors", defect: .overlapping) { $0.tensors[1] = ("b", [16], 0, 0) },
        Case(name: "tensor data past the end", defect: .tensorPastEnd) { $0.dataBytes = 48 },
        Case(name: "offset far past the end", defect: .tensorPastEnd) { $0.tensors[1].offset = 1 << 62 },
        Case(name: "file ends in the header", defect: .truncated) {
            $0.tensors = [("a", [8], 0, 0)]; $0.dataBytes = 0; $0.metadata.append(("general.x", 4, Data([1])))
        }
    ]

    @Test(arguments: cases)
    func corruptFilesAreRejectedWithTheirOwnError(_ c: Case) throws {
        let scratch = ScratchDirectory()
        var builder = Builder()
        c.build(&builder)
        var data = builder.bytes()
        if c.name == "file ends in the header" { data = data.prefix(60) }
        let path = scratch.file("bad.gguf")
        try data.write(to: URL(fileURLWithPath: path))
        #expect {
            try GGUFFile(path: path)
        } throws: { error in
            guard case .malformedGGUF(_, let defect, _) = error as? FormatError else { return false }
            return defect == c.defect
        }
    }

    /// Well-formed files that are not a SmallThinker we can import: each has its own error, and
    /// nothing is written.
    @Test(arguments: [
        "wrong architecture", "missing key", "missing tensor", "wrong shape", "unexpected tensor", "bad gating",
        "two billion layers"
    ])
    func wrongModelsAreRejectedWithNoOutput(_ name: String) throws {
        let scratch = ScratchDirectory()
        let package = try PackageReader(path: try convertFixture("tiny-4b-like", in: scratch))
        let plan = try GGUFExport.plan(package: package, dtype: nil, forceLayout: false)
        var metadata = plan.metadata, tensors = plan.tensors
        let defect: GGUFDefect
        switch name {
        case "wrong architecture":
            metadata[0].1 = .string("llama")
            defect = .wrongArchitecture
        case "missing key":
            metadata.removeAll { $0.0 == "smallthinker.expert_count" }
            defect = .missingKey
        case "missing tensor":
            tensors.removeAll { $0.name == "blk.2.attn_k.weight" }
            defect = .missingTensor
        case "wrong shape":
            let i = tensors.firstIndex { $0.name == "blk.0.ffn_down_exps.weight" }!
            let t = tensors[i]
            tensors[i] = GGUFWriter.Tensor(
                name: t.name, dimensions: [t.dimensions[0], t.dimensions[1] / 2, t.dimensions[2] * 2], type: t.type, write: t.write)
            defect = .wrongShape
        case "unexpected tensor":
            tensors.append(
                GGUFWriter.Tensor(name: "rope_freqs.weight", dimensions: [8], type: .f32) { (sink) throws(FormatError) in
                    try sink.append(bytes: [UInt8](repeating: 0, count: 32))
                })
            defect = .unexpectedTensor
        case "two billion layers":
            // The fuzzer's find: the import built per-layer arrays before checking the count
            // (a 2 GB allocation).
            let i = metadata.firstIndex { $0.0 == "smallthinker.block_count" }!
            metadata[i].1 = .uint32(2_046_820_385)
            defect = .invalidValue
        default:
            let i = metadata.firstIndex { $0.0 == "smallthinker.expert_gating_func" }!
            metadata[i].1 = .uint32(3)
            defect = .invalidValue
        }
        let path = scratch.file("bad.gguf"), output = scratch.file("out.stpk")
        try GGUFWriter.write(metadata: metadata, tensors: tensors, alignment: 4096, to: path, overwrite: false)
        #expect {
            try GGUFImport.write(try GGUFImport.plan(try GGUFFile(path: path)), to: output, overwrite: false)
        } throws: { error in
            guard case .malformedGGUF(_, let d, let detail) = error as? FormatError else { return false }
            return d == defect && (name != "two billion layers" || detail.contains("block_count is 2046820385"))
        }
        #expect(scratch.entries == ["bad.gguf", "tiny-4b-like-source.stpk"])
    }
}
