import Foundation
import Testing
@testable import Format

/// `stconvert CHECKPOINT --type q4_0|q8_0` reads the planned conversion as the quantiser's source:
/// it writes exactly the tensors, bundles and files that stconvert followed by stquant write
/// (offsets, checksums and bytes); only the provenance says how it was made.
@Suite struct OneStepConversionTests {
    @Test(arguments: Fixtures.models, [TensorDType.q4_0, .q8_0])
    func oneStepWritesWhatConvertThenQuantiseWrites(model: String, type: TensorDType) throws {
        let scratch = ScratchDirectory()
        let conversion = try Converter.plan(checkpoint: try Checkpoint(directory: Fixtures.model(model)), dtype: nil)
        let policy = QuantizationPolicy(type: type)
        let one = scratch.file("one.stpk"), two = scratch.file("two.stpk")
        try Quantizer.write(
            try Quantizer.plan(source: try ConversionSource(conversion), policy: policy), to: one, overwrite: false, threads: 2)
        let float = try convertFixture(model, in: scratch)
        try Quantizer.write(
            try Quantizer.plan(source: try PackageReader(path: float), policy: policy), to: two, overwrite: false, threads: 2)
        let a = try PackageReader(path: one), b = try PackageReader(path: two)
        try a.verify()
        #expect(a.manifest.config == b.manifest.config)
        #expect(a.manifest.tensors == b.manifest.tensors)
        #expect(a.manifest.bundles == b.manifest.bundles)
        #expect(a.manifest.files == b.manifest.files)
        for t in a.manifest.tensors { #expect(a.bytes(of: t).elementsEqual(b.bytes(of: b.tensor(t.name)!)), "\(t.name)") }
        let provenance = try #require(a.manifest.provenance["quantization"]?.objectValue)
        #expect(provenance["source_checkpoint"] != nil && provenance["source_package"] == nil)
    }
}
