import Foundation
import Format
import Testing

/// GGUF files in the block types `llama-quantize`'s presets write (K-quants and the others),
/// imported as a user imports them. The gguf package is the authority on what the blocks hold
/// (`Tests/Fixtures/gguf/kquants.py` makes the blocks and files).
@Suite struct KQuantImportTests {
    static let helper = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/gguf/kquants.py").path
    static let trained = URL(fileURLWithPath: Tools.fixtures).deletingLastPathComponent().appendingPathComponent("trained").path

    static func python(_ arguments: [String]) throws -> Tools.Result {
        try Tools.run("/usr/bin/env", ["python3", helper] + arguments)
    }

    /// Every block type the import decodes gives, value for value, what the gguf package's
    /// dequantisation gives for the same random blocks (random quants, finite scales of both
    /// signs and several magnitudes, subnormal ones included).
    @Test func blocksDecodeAsTheGGUFPackageDecodesThem() throws {
        let scratch = ToolScratch()
        let made = try Self.python(["samples", scratch.path])
        #expect(made.status == 0, "\(made.stderr)")
        let decoded = GGMLType.allCases.filter { $0.packageType == nil }
        #expect(decoded.count == 10)
        for type in decoded {
            let name = type.name.uppercased()
            let blocks = try Data(contentsOf: URL(fileURLWithPath: scratch.file("\(name).blocks")))
            let expected = try Data(contentsOf: URL(fileURLWithPath: scratch.file("\(name).f32"))).withUnsafeBytes {
                Array($0.bindMemory(to: Float.self))
            }
            #expect(blocks.count / type.blockBytes * type.blockSize == expected.count, "\(name)")
            var values = [Float](repeating: .nan, count: expected.count)
            blocks.withUnsafeBytes { b in
                values.withUnsafeMutableBufferPointer { type.decode(b.baseAddress!, count: expected.count, into: $0.baseAddress!) }
            }
            let differing = zip(values, expected).filter { $0.bitPattern != $1.bitPattern }.count
            #expect(differing == 0, "\(name): \(differing) of \(expected.count) values differ from the gguf package's")
        }
    }

    /// Files typed as `llama-quantize`'s Q4_K_M and Q6_K presets type them (with their
    /// fallbacks, Q5_0 and Q8_0, for the expert down rows of 128 values) are imported, say what
    /// they converted and what it cost, verify, and run: against the import of the same model's
    /// float32 GGUF, over 500 tokens of held-out text. Measured (mean KL): Q4_K_M stored as q4_0 (the
    /// default) 0.051, as q8_0 0.031; Q6_K as q8_0 (the default) 0.009; plain q4_0 from float
    /// weights 0.040.
    @Test func kQuantFilesImportAndRun() throws {
        let scratch = ToolScratch()
        let float = scratch.file("f32.stpk"), gguf = scratch.file("f32.gguf"), base = scratch.file("base.stpk")
        #expect(try Tools.run("stconvert", [Self.trained + "/trained-21b-like", "-o", float, "--dtype", "f32", "-q"]).status == 0)
        #expect(try Tools.run("stconvert", [float, "-o", gguf, "--dtype", "f32", "--force-layout", "-q"]).status == 0)
        #expect(try Tools.run("stconvert", [gguf, "-o", base, "-q"]).status == 0)
        // The first 2,000 characters of the held-out text (about 500 tokens): enough for the
        // bounds, and quick in a debug build.
        let text = scratch.file("held-out.txt")
        let full = try String(contentsOfFile: Self.trained + "/held-out-sample.txt", encoding: .utf8)
        try String(full.prefix(2000)).write(toFile: text, atomically: true, encoding: .utf8)
        var sizes: [String: Int] = [:]
        for (preset, type, converted, bound) in [
            ("q4_k_m", nil, ["q4_K → q4_0", "q5_0 → q8_0", "q6_K → q8_0"], 0.08), ("q4_k_m", "q8_0", ["q4_K → q8_0"], 0.05),
            ("q6_k", nil, ["q6_K → q8_0"], 0.02)
        ] as [(String, String?, [String], Double)] {
            let file = scratch.file("\(preset).gguf"), package = scratch.file("\(preset)-\(type ?? "default").stpk")
            let made = try Self.python(["requantize", gguf, file, preset])
            #expect(made.status == 0, "\(made.stderr)")
            let label = "\(preset) as \(type ?? "the default")"
            let imported = try Tools.run("stconvert", [file, "-o", package] + (type.map { ["--type", $0] } ?? []))
            #expect(imported.status == 0, "\(label): \(imported.stderr)")
            for c in converted {
                #expect(imported.stdout.contains("GGUF tensors \(c): relative RMS error"), "\(label): \(imported.stdout)")
            }
            #expect(try Tools.run("strun", ["verify", package]).status == 0, "\(label)")
            let compared = try Tools.run("strun", ["compare", base, package, "--file", text, "--json"])
            #expect(compared.status == 0, "\(label): \(compared.stderr)")
            let c = try JSONSerialization.jsonObject(with: Data(compared.stdout.utf8)) as! [String: Any]
            let kl = c["mean_kl"] as! Double, top1 = c["top1_agreement"] as! Double
            print("\(label): mean KL \(kl), top-1 \(top1)")
            #expect(kl > 0 && kl < bound && top1 > 0.7, "\(label): mean KL \(kl), top-1 \(top1)")
            sizes[label] = try FileManager.default.attributesOfItem(atPath: package)[.size] as? Int
        }
        #expect((sizes["q4_k_m as the default"] ?? 0) * 4 < (sizes["q4_k_m as q8_0"] ?? 0) * 3, "\(sizes)")
    }

    /// A K-quant block whose scale is not finite, and a file cut short, are the reader's clear
    /// errors, and nothing is written.
    @Test func corruptAndTruncatedKQuantFilesAreClearErrors() throws {
        let scratch = ToolScratch()
        let float = scratch.file("f32.stpk"), gguf = scratch.file("f32.gguf"), file = scratch.file("q4_k_m.gguf")
        #expect(try Tools.run("stconvert", [Self.trained + "/trained-21b-like", "-o", float, "--dtype", "f32", "-q"]).status == 0)
        #expect(try Tools.run("stconvert", [float, "-o", gguf, "--dtype", "f32", "--force-layout", "-q"]).status == 0)
        #expect(try Self.python(["requantize", gguf, file, "q4_k_m"]).status == 0)
        let parsed = try GGUFFile(path: file)
        let tensor = try #require(parsed.tensors.first { $0.type == .q4_K && $0.name.hasPrefix("blk.1.") })
        var bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        // The seventh block's d (its first two bytes) becomes +infinity.
        bytes[tensor.offset + 6 * GGMLType.q4_K.blockBytes + 1] = 0x7C
        bytes[tensor.offset + 6 * GGMLType.q4_K.blockBytes] = 0x00
        let corrupt = scratch.file("corrupt.gguf"), out = scratch.file("out.stpk")
        try bytes.write(to: URL(fileURLWithPath: corrupt))
        var result = try Tools.run("stconvert", [corrupt, "-o", out])
        #expect(result.status != 0 && result.stderr.contains(tensor.name) && result.stderr.contains("q4_K block 6"), "\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
        let truncated = scratch.file("truncated.gguf")
        try bytes.prefix(tensor.offset + tensor.length / 2).write(to: URL(fileURLWithPath: truncated))
        result = try Tools.run("stconvert", [truncated, "-o", out])
        #expect(result.status != 0 && result.stderr.contains("past the end"), "\(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
    }
}
