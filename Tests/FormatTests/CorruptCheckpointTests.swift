import Foundation
import Testing
@testable import Format

/// One case per way a checkpoint can be wrong. Each must fail with its specific error, and leave
/// no output and no temporary file behind.
@Suite struct CorruptCheckpointTests {
    enum Expected {
        case safetensors(SafetensorsDefect)
        case checkpoint(CheckpointDefect)
        case io
    }

    struct Case: CustomTestStringConvertible, Sendable {
        let name: String
        let model: String
        let expected: Expected
        /// Damages the copied checkpoint folder.
        let damage: @Sendable (String) throws -> Void
        var testDescription: String { name }
    }

    static let weights = "/model.safetensors"

    /// Rewrites the single weights file with a changed header.
    static func editHeader(_ dir: String, _ edit: (inout [String: Any], inout Data) -> Void) throws {
        var file = try RawSafetensors(path: dir + weights)
        edit(&file.header, &file.data)
        try file.write(to: dir + weights)
    }

    static func editConfig(_ dir: String, _ edit: (inout [String: Any]) -> Void) throws {
        let url = URL(fileURLWithPath: dir + "/config.json")
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        edit(&config)
        try JSONSerialization.data(withJSONObject: config).write(to: url)
    }

    /// Rewrites the shard index's weight_map.
    static func editIndex(_ dir: String, _ edit: (inout [String: String]) -> Void) throws {
        let url = URL(fileURLWithPath: dir + "/model.safetensors.index.json")
        var index = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        var map = index["weight_map"] as! [String: String]
        edit(&map)
        index["weight_map"] = map
        try JSONSerialization.data(withJSONObject: index).write(to: url)
    }

    static func headerText(_ dir: String) throws -> (text: String, data: Data) {
        let file = try RawSafetensors(path: dir + weights)
        let text = String(data: try JSONSerialization.data(withJSONObject: file.header, options: [.sortedKeys]), encoding: .utf8)!
        return (text, file.data)
    }

    static func setEntry(_ header: inout [String: Any], _ name: String, _ key: String, _ value: Any) {
        var entry = header[name] as! [String: Any]
        entry[key] = value
        header[name] = entry
    }

    static let q = "model.layers.0.self_attn.q_proj.weight"
    static let k = "model.layers.0.self_attn.k_proj.weight"

    static let cases: [Case] = [
        Case(name: "file shorter than the length prefix", model: "tiny-4b-like", expected: .safetensors(.truncated)) { dir in
            try Data([1, 2, 3]).write(to: URL(fileURLWithPath: dir + weights))
        },
        Case(name: "header length past the end of the file", model: "tiny-4b-like", expected: .safetensors(.headerLengthOutOfRange)) {
            dir in
            var bytes = try Data(contentsOf: URL(fileURLWithPath: dir + weights))
            bytes.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64(bytes.count).littleEndian) { Data($0) })
            try bytes.write(to: URL(fileURLWithPath: dir + weights))
        },
        Case(name: "absurd header length", model: "tiny-4b-like", expected: .safetensors(.headerLengthOutOfRange)) { dir in
            var bytes = try Data(contentsOf: URL(fileURLWithPath: dir + weights))
            bytes.replaceSubrange(0..<8, with: withUnsafeBytes(of: UInt64.max.littleEndian) { Data($0) })
            try bytes.write(to: URL(fileURLWithPath: dir + weights))
        },
        Case(name: "header is not JSON", model: "tiny-4b-like", expected: .safetensors(.invalidHeaderJSON)) { dir in
            let (text, data) = try headerText(dir)
            try RawSafetensors.write(headerText: String(text.dropLast(5)) + "!!!!!", data: data, to: dir + weights)
        },
        Case(name: "tensor named twice in one header", model: "tiny-4b-like", expected: .safetensors(.invalidHeaderJSON)) { dir in
            let (text, data) = try headerText(dir)
            let duplicate = "\"\(k)\":{\"dtype\":\"BF16\",\"shape\":[32,64],\"data_offsets\":[0,4096]},"
            try RawSafetensors.write(headerText: "{" + duplicate + text.dropFirst(), data: data, to: dir + weights)
        },
        Case(name: "entry without data_offsets", model: "tiny-4b-like", expected: .safetensors(.malformedEntry)) { dir in
            try editHeader(dir) { header, _ in
                var entry = header[q] as! [String: Any]
                entry.removeValue(forKey: "data_offsets")
                header[q] = entry
            }
        },
        Case(name: "negative dimension", model: "tiny-4b-like", expected: .safetensors(.malformedEntry)) { dir in
            try editHeader(dir) { header, _ in setEntry(&header, q, "shape", [-64, 64]) }
        },
        Case(name: "unsupported dtype", model: "tiny-4b-like", expected: .safetensors(.unsupportedDtype)) { dir in
            try editHeader(dir) { header, _ in setEntry(&header, q, "dtype", "I64") }
        },
        Case(name: "offsets past the data section", model: "tiny-4b-like", expected: .safetensors(.offsetsOutOfRange)) { dir in
            try editHeader(dir) { header, data in
                let n = data.count
                setEntry(&header, q, "data_offsets", [n - 100, n + 8092])
            }
        },
        Case(name: "data truncated", model: "tiny-4b-like", expected: .safetensors(.offsetsOutOfRange)) { dir in
            let url = URL(fileURLWithPath: dir + weights)
            let bytes = try Data(contentsOf: url)
            try bytes.prefix(bytes.count - 1000).write(to: url)
        },
        Case(name: "end before begin", model: "tiny-4b-like", expected: .safetensors(.offsetsOutOfRange)) { dir in
            try editHeader(dir) { header, _ in setEntry(&header, q, "data_offsets", [8192, 0]) }
        },
        Case(name: "byte length disagrees with the shape", model: "tiny-4b-like", expected: .safetensors(.byteLengthMismatch)) { dir in
            try editHeader(dir) { header, _ in setEntry(&header, q, "shape", [64, 32]) }
        },
        Case(name: "two tensors share bytes", model: "tiny-4b-like", expected: .safetensors(.overlappingTensors)) { dir in
            try editHeader(dir) { header, _ in
                let other = (header[q] as! [String: Any])["data_offsets"] as! [Int]
                setEntry(&header, k, "data_offsets", [other[0] + 2, other[0] + 2 + 4096])
            }
        },
        Case(name: "weights file is a directory", model: "tiny-4b-like", expected: .io) { dir in
            try FileManager.default.removeItem(atPath: dir + weights)
            try FileManager.default.createDirectory(atPath: dir + weights, withIntermediateDirectories: false)
        },
        Case(name: "no weights", model: "tiny-4b-like", expected: .checkpoint(.missingFile)) { dir in
            try FileManager.default.removeItem(atPath: dir + weights)
        },
        Case(name: "no config.json", model: "tiny-4b-like", expected: .checkpoint(.missingFile)) { dir in
            try FileManager.default.removeItem(atPath: dir + "/config.json")
        },
        Case(name: "config.json is not JSON", model: "tiny-4b-like", expected: .checkpoint(.invalidConfig)) { dir in
            try Data("{\"num_hidden_layers\": 4,".utf8).write(to: URL(fileURLWithPath: dir + "/config.json"))
        },
        Case(name: "another architecture", model: "tiny-4b-like", expected: .checkpoint(.wrongModelType)) { dir in
            try editConfig(dir) { $0["model_type"] = "qwen3_moe" }
        },
        Case(name: "rope_layout shorter than the layer count", model: "tiny-4b-like", expected: .checkpoint(.invalidConfig)) { dir in
            try editConfig(dir) { $0["rope_layout"] = [1, 1, 1] }
        },
        Case(name: "layout value other than 0/1", model: "tiny-4b-like", expected: .checkpoint(.invalidConfig)) { dir in
            try editConfig(dir) { $0["sliding_window_layout"] = [0, 2, 0, 0] }
        },
        Case(name: "more active experts than experts", model: "tiny-4b-like", expected: .checkpoint(.invalidConfig)) { dir in
            try editConfig(dir) { $0["moe_num_active_primary_experts"] = 9 }
        },
        Case(name: "heads not a multiple of KV heads", model: "tiny-4b-like", expected: .checkpoint(.invalidConfig)) { dir in
            try editConfig(dir) { $0["num_key_value_heads"] = 3 }
        },
        Case(name: "window layer without a window size", model: "tiny-21b-like", expected: .checkpoint(.invalidConfig)) { dir in
            try editConfig(dir) { $0.removeValue(forKey: "sliding_window_size") }
        },
        Case(name: "a tensor is missing", model: "tiny-4b-like", expected: .checkpoint(.missingTensor)) { dir in
            try editHeader(dir) { header, _ in header.removeValue(forKey: "model.layers.3.block_sparse_moe.experts.7.down.weight") }
        },
        Case(name: "an unexpected tensor", model: "tiny-4b-like", expected: .checkpoint(.unexpectedTensor)) { dir in
            try editHeader(dir) { header, data in
                header["model.layers.0.mlp.extra.weight"] = ["dtype": "BF16", "shape": [2], "data_offsets": [data.count, data.count + 4]]
                data.append(Data(count: 4))
            }
        },
        Case(name: "lm_head in a tied checkpoint", model: "tiny-4b-like", expected: .checkpoint(.unexpectedTensor)) { dir in
            try editHeader(dir) { header, data in
                header["lm_head.weight"] = ["dtype": "BF16", "shape": [512, 64], "data_offsets": [data.count, data.count + 65536]]
                data.append(Data(count: 65536))
            }
        },
        Case(name: "a tensor has the wrong shape", model: "tiny-4b-like", expected: .checkpoint(.wrongShape)) { dir in
            try editHeader(dir) { header, _ in setEntry(&header, q, "shape", [32, 128]) }
        },
        Case(name: "config disagrees with the tensors", model: "tiny-4b-like", expected: .checkpoint(.wrongShape)) { dir in
            try editConfig(dir) { $0["moe_ffn_hidden_size"] = 64 }
        },
        Case(name: "index names a missing shard", model: "tiny-untied", expected: .checkpoint(.missingShard)) { dir in
            try FileManager.default.removeItem(atPath: dir + "/model-00002-of-00003.safetensors")
        },
        Case(name: "index puts a tensor in the wrong shard", model: "tiny-untied", expected: .checkpoint(.unexpectedTensor)) { dir in
            try editIndex(dir) { map in map["lm_head.weight"] = "model-00001-of-00003.safetensors" }
        },
        Case(name: "index lists a tensor no shard has", model: "tiny-untied", expected: .checkpoint(.missingTensor)) { dir in
            try editIndex(dir) { map in map["model.layers.9.input_layernorm.weight"] = "model-00001-of-00003.safetensors" }
        },
        Case(name: "index with a path outside the folder", model: "tiny-untied", expected: .checkpoint(.invalidIndex)) { dir in
            try editIndex(dir) { map in map["lm_head.weight"] = "../elsewhere.safetensors" }
        },
        Case(name: "index is not JSON", model: "tiny-untied", expected: .checkpoint(.invalidIndex)) { dir in
            try Data("weight_map".utf8).write(to: URL(fileURLWithPath: dir + "/model.safetensors.index.json"))
        },
        Case(name: "a tensor in two shards", model: "tiny-untied", expected: .checkpoint(.duplicateTensor)) { dir in
            // Copy shard 3's lm_head into shard 1 as well.
            let path3 = dir + "/model-00003-of-00003.safetensors", path1 = dir + "/model-00001-of-00003.safetensors"
            let three = try RawSafetensors(path: path3)
            var one = try RawSafetensors(path: path1)
            let bytes = three.bytes("lm_head.weight")
            one.header["lm_head.weight"] = [
                "dtype": "BF16", "shape": [512, 64], "data_offsets": [one.data.count, one.data.count + bytes.count]
            ]
            one.data.append(bytes)
            try one.write(to: path1)
        }
    ]

    @Test(arguments: cases)
    func corruptCheckpointIsRejectedWithItsOwnErrorAndNoOutput(_ c: Case) throws {
        let scratch = ScratchDirectory()
        let dir = scratch.copyModel(c.model)
        try c.damage(dir)
        let output = scratch.file("out.stpk")
        var caught: FormatError?
        do {
            let plan = try Converter.plan(checkpoint: try Checkpoint(directory: dir), dtype: nil)
            try Converter.write(plan, to: output, overwrite: false)
        } catch {
            caught = error
        }
        let error = try #require(caught, "\(c.name) was accepted")
        switch c.expected {
        case .safetensors(let defect): #expect(error.safetensorsDefect == defect, "\(error)")
        case .checkpoint(let defect): #expect(error.checkpointDefect == defect, "\(error)")
        case .io: if case .io = error {} else { Issue.record("expected an I/O error, got \(error)") }
        }
        #expect(!error.description.isEmpty && !error.description.contains("\n"), "one-line message")
        #expect(scratch.entries == ["checkpoint"], "nothing written beside the output")
    }

    @Test func float16ConversionRefusesValuesPastItsRange() throws {
        let scratch = ScratchDirectory()
        let dir = scratch.copyModel("tiny-4b-like")
        try Self.editHeader(dir) { header, data in
            // bf16 0x7F00 is about 1.7e38: fine in bf16, past float16's 65504.
            let range = ((header[Self.q] as! [String: Any])["data_offsets"] as! [Int])
            data[range[0]] = 0x00
            data[range[0] + 1] = 0x7F
        }
        let output = scratch.file("out.stpk")
        let plan = try Converter.plan(checkpoint: try Checkpoint(directory: dir), dtype: .f16)
        #expect {
            try Converter.write(plan, to: output, overwrite: false)
        } throws: { error in
            guard case .unrepresentable(let tensor, _) = error as? FormatError else { return false }
            return tensor == Self.q
        }
        #expect(scratch.entries == ["checkpoint"])
    }
}
