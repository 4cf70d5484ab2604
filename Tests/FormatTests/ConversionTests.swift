import Foundation
import Testing
@testable import Format

/// Every fixture converts, and the package holds exactly the checkpoint's values in the
/// storage-optimised layout.
@Suite struct ConversionTests {
    /// All checkpoint tensors of a fixture, by Hugging Face name, read independently.
    func sourceTensors(_ model: String) throws -> [String: (shard: RawSafetensors, name: String)] {
        let dir = Fixtures.model(model)
        var result: [String: (RawSafetensors, String)] = [:]
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".safetensors") }
        for file in files {
            let shard = try RawSafetensors(path: dir + "/" + file)
            for name in shard.tensorNames { result[name] = (shard, name) }
        }
        return result
    }

    @Test(arguments: Fixtures.models)
    func convertedPackageHoldsEverySourceTensorBitForBit(model: String) throws {
        let scratch = ScratchDirectory()
        let reader = try PackageReader(path: try convertFixture(model, in: scratch))
        try reader.verify()
        let sources = try sourceTensors(model)
        #expect(reader.manifest.tensors.count == sources.count)
        for t in reader.manifest.tensors {
            let (shard, name) = try #require(sources[t.sourceName], "\(t.sourceName) not in the checkpoint")
            let source = shard.entry(name)
            let stored = Data(reader.bytes(of: t))
            #expect(t.dtype == .bf16)
            if t.layout == .rowMajor {
                #expect(t.shape == source.shape)
                #expect(stored == shard.bytes(name), "\(t.name) differs from \(name)")
            } else {
                // Down matrices: stored [ffn, hidden], the transpose of the source [hidden, ffn].
                #expect(t.shape == [source.shape[1], source.shape[0]])
                let rows = source.shape[0], cols = source.shape[1]
                let src = shard.bytes(name)
                var mismatches = 0
                src.withUnsafeBytes { s in
                    stored.withUnsafeBytes { d in
                        for r in 0..<rows {
                            for c in 0..<cols
                            where s.loadUnaligned(fromByteOffset: (r * cols + c) * 2, as: UInt16.self)
                                != d.loadUnaligned(fromByteOffset: (c * rows + r) * 2, as: UInt16.self)
                            {
                                mismatches += 1
                            }
                        }
                    }
                }
                #expect(mismatches == 0, "\(t.name): \(mismatches) elements are not the transpose of \(name)")
            }
        }
    }

    @Test(arguments: Fixtures.models)
    func expertBundlesAreLayerMajorAlignedAndContiguous(model: String) throws {
        let scratch = ScratchDirectory()
        checkStorageLayout(try PackageReader(path: try convertFixture(model, in: scratch)))
    }

    @Test func configIsNormalisedWithExplicitRouting() throws {
        let scratch = ScratchDirectory()
        let fourB = try PackageReader(path: try convertFixture("tiny-4b-like", in: scratch)).manifest.config
        #expect(fourB.routerSoftmax == false, "a missing moe_primary_router_apply_softmax means sigmoid")
        let twentyOne = try PackageReader(path: try convertFixture("tiny-21b-like", in: scratch)).manifest.config
        #expect(twentyOne.routerSoftmax == true)
        #expect(twentyOne.ropeLayout == [false, true, true, true, false, true, true, true])
        #expect(twentyOne.slidingWindowLayout == twentyOne.ropeLayout)
        #expect(twentyOne.slidingWindowSize == 8)
        #expect(twentyOne.eosTokenIDs == [2, 3])
        #expect(twentyOne.expertFFNSize == 48)
    }

    @Test func checkpointFilesAreStoredVerbatimWithProvenance() throws {
        let scratch = ScratchDirectory()
        let reader = try PackageReader(path: try convertFixture("tiny-untied", in: scratch))
        for name in ["config.json", "generation_config.json"] {
            let original = try Data(contentsOf: URL(fileURLWithPath: Fixtures.model("tiny-untied") + "/" + name))
            #expect(reader.fileContents(name).map { Data($0) } == original)
        }
        let sources = reader.manifest.provenance["source_files"]?.arrayValue ?? []
        let names = sources.compactMap { $0.objectValue?["name"]?.stringValue }
        #expect(names.contains("model-00002-of-00003.safetensors"))
        #expect(names.contains("model.safetensors.index.json"))
        #expect(reader.manifest.provenance["converter"]?.stringValue?.hasPrefix("stconvert ") == true)
    }

    @Test func float32ConversionIsExactAndFloat16RoundsToNearest() throws {
        let scratch = ScratchDirectory()
        let f32 = try PackageReader(path: try convertFixture("tiny-4b-like", in: scratch, dtype: .f32))
        let f16 = try PackageReader(path: try convertFixture("tiny-4b-like", in: scratch, dtype: .f16))
        try f32.verify()
        try f16.verify()
        let shard = try RawSafetensors(path: Fixtures.model("tiny-4b-like") + "/model.safetensors")
        for name in ["token_embd", "layers.2.attn_q", "layers.1.ffn_norm"] {
            let t32 = f32.tensor(name)!, t16 = f16.tensor(name)!
            let source = shard.floats(t32.sourceName)
            let stored32 = Array(f32.bytes(of: t32).bindMemory(to: Float.self))
            #expect(stored32 == source)
            let stored16 = f16.bytes(of: t16).bindMemory(to: UInt16.self).map { Float(Float16(bitPattern: $0)) }
            #expect(zip(stored16, source).allSatisfy { $0 == Float(Float16($1)) })
        }
        // Expert down stays transposed after conversion.
        let down = f32.tensor("layers.3.experts.5.down")!
        let source = shard.floats(down.sourceName)  // [hidden, ffn]
        let stored = Array(f32.bytes(of: down).bindMemory(to: Float.self))  // [ffn, hidden]
        let hidden = down.shape[1], ffn = down.shape[0]
        #expect((0..<hidden).allSatisfy { h in (0..<ffn).allSatisfy { f in stored[f * hidden + h] == source[h * ffn + f] } })
    }

    @Test func existingOutputIsRefusedWithoutOverwrite() throws {
        let scratch = ScratchDirectory()
        let output = try convertFixture("tiny-4b-like", in: scratch)
        let before = try Data(contentsOf: URL(fileURLWithPath: output))
        let plan = try Converter.plan(checkpoint: try Checkpoint(directory: Fixtures.model("tiny-4b-like")), dtype: .f32)
        #expect(throws: FormatError.outputExists(path: output)) { try Converter.write(plan, to: output, overwrite: false) }
        #expect(try Data(contentsOf: URL(fileURLWithPath: output)) == before)
        try Converter.write(plan, to: output, overwrite: true)
        #expect(try PackageReader(path: output).manifest.tensors[0].dtype == .f32)
        #expect(scratch.entries == [output.split(separator: "/").last.map(String.init)!], "no temporary files left")
    }

    @Test func progressWalksTheDenseTensorsThenEachLayersExperts() throws {
        let scratch = ScratchDirectory()
        let plan = try Converter.plan(checkpoint: try Checkpoint(directory: Fixtures.model("tiny-21b-like")), dtype: nil)
        var reports: [WriteProgress] = []
        try Converter.write(plan, to: scratch.file("p.stpk"), overwrite: false) { reports.append($0) }
        #expect(reports.count == plan.manifest.tensors.count + 1)
        #expect(zip(reports, reports.dropFirst()).allSatisfy { $0.bytesWritten <= $1.bytesWritten })
        let layers = reports.compactMap(\.layer)
        #expect(layers == layers.sorted() && Set(layers) == Set(0..<8), "every layer's experts, in order")
        #expect(reports.prefix(58).allSatisfy { $0.layer == nil }, "58 dense tensors come first")
        #expect(reports.last!.bytesWritten == plan.outputSize && reports.last!.tensorsWritten == plan.manifest.tensors.count)
    }

    @Test func dryRunPlanMatchesTheWrittenPackage() throws {
        let scratch = ScratchDirectory()
        let plan = try Converter.plan(checkpoint: try Checkpoint(directory: Fixtures.model("tiny-21b-like")), dtype: nil)
        let output = scratch.file("out.stpk")
        try Converter.write(plan, to: output, overwrite: false)
        let reader = try PackageReader(path: output)
        #expect(reader.header.fileLength == plan.outputSize)
        #expect(reader.manifest.tensors.map(\.offset) == plan.manifest.tensors.map(\.offset))
        #expect(reader.manifest.bundles.map(\.offset) == plan.manifest.bundles.map(\.offset))
    }
}
