import Foundation
import Format
import Testing
@testable import Engine

/// A synthetic checkpoint whose rows are 256 values wide (the tiny fixtures' 64 and 96 are too
/// narrow for `row_major_b8`, which groups a row's blocks in eights), written in Hugging Face
/// layout and taken through the same conversion and quantisation a user runs.
enum WideModel {
    static let hidden = 256, heads = 4, kvHeads = 2, headDim = 32, experts = 8, active = 4, ffn = 64, layers = 2, vocab = 512

    /// The checkpoint folder: config.json and one float32 model.safetensors with seeded weights.
    static func checkpoint(in directory: String) throws -> String {
        let path = directory + "/wide-checkpoint"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        let config: [String: Any] = [
            "architectures": ["SmallThinkerForCausalLM"], "model_type": "smallthinker",
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kvHeads,
            "head_dim": headDim, "moe_num_primary_experts": experts, "moe_num_active_primary_experts": active,
            "moe_ffn_hidden_size": ffn, "rope_layout": [1, 0], "rope_theta": 10000.0, "sliding_window_layout": [0, 1],
            "sliding_window_size": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "vocab_size": vocab,
            "bos_token_id": 1, "eos_token_id": [2], "max_position_embeddings": 256, "torch_dtype": "float32"
        ]
        try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]).write(to: URL(fileURLWithPath: path + "/config.json"))
        var tensors: [(name: String, shape: [Int], scale: Float?)] = [
            ("model.embed_tokens.weight", [vocab, hidden], 1), ("model.norm.weight", [hidden], nil)
        ]
        for n in 0..<layers {
            let p = "model.layers.\(n)."
            tensors += [
                (p + "input_layernorm.weight", [hidden], nil), (p + "post_attention_layernorm.weight", [hidden], nil),
                (p + "self_attn.q_proj.weight", [heads * headDim, hidden], 2),
                (p + "self_attn.k_proj.weight", [kvHeads * headDim, hidden], 2),
                (p + "self_attn.v_proj.weight", [kvHeads * headDim, hidden], 2),
                (p + "self_attn.o_proj.weight", [hidden, heads * headDim], 2),
                (p + "block_sparse_moe.primary_router.weight", [experts, hidden], 2)
            ]
            for e in 0..<experts {
                let q = p + "block_sparse_moe.experts.\(e)."
                tensors += [
                    (q + "gate.weight", [ffn, hidden], 2), (q + "up.weight", [ffn, hidden], 2), (q + "down.weight", [hidden, ffn], 2)
                ]
            }
        }
        // Weights uniform with standard deviation ~ scale/√fan-in; norm weights near 1.
        var g = KernelTests.Generator(state: 2026)
        var header: [String: Any] = [:], data = Data()
        for t in tensors {
            let count = t.shape.reduce(1, *)
            let values: [Float] = (0..<count).map { _ in
                t.scale.map { $0 * g.next() / Float(t.shape.last!).squareRoot() * 1.7 } ?? 1 + 0.1 * g.next()
            }
            header[t.name] = ["dtype": "F32", "shape": t.shape, "data_offsets": [data.count, data.count + 4 * count]]
            values.withUnsafeBytes { data.append(contentsOf: $0) }
        }
        var headerBytes = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while headerBytes.count % 8 != 0 { headerBytes.append(0x20) }
        var file = Data()
        withUnsafeBytes(of: UInt64(headerBytes.count).littleEndian) { file.append(contentsOf: $0) }
        file.append(headerBytes)
        file.append(data)
        try file.write(to: URL(fileURLWithPath: path + "/model.safetensors"))
        return path
    }

    /// The float32 package, the default Q4_0 package and a `--plain-rows` one (with `overrides`,
    /// as `--tensor-type`, applied to both).
    static func packages(
        in scratch: Scratch, overrides: [(pattern: String, type: TensorDType)] = []
    ) throws -> (f32: String, q4_0: String, plain: String) {
        let f32 = scratch.file("wide-f32.stpk")
        if !FileManager.default.fileExists(atPath: f32) {
            try Converter.write(
                try Converter.plan(checkpoint: try Checkpoint(directory: try checkpoint(in: scratch.path)), dtype: .f32), to: f32,
                overwrite: true)
        }
        var out: [String] = []
        for grouped in [true, false] {
            let path = scratch.file("wide-q4_0\(overrides.isEmpty ? "" : "-override")\(grouped ? "" : "-plain").stpk")
            let policy = QuantizationPolicy(type: .q4_0, overrides: overrides, groupedLayouts: grouped)
            try Quantizer.write(
                try Quantizer.plan(source: try PackageReader(path: f32), policy: policy), to: path, overwrite: true, threads: 2)
            out.append(path)
        }
        return (f32, out[0], out[1])
    }

    static func tokens(_ count: Int) -> [Int] {
        var t = KernelTests.Generator(state: 9)
        return (0..<count).map { _ in Int((t.next() + 1) / 2 * Float(vocab - 1)) }
    }
}

@Suite struct WideModelTests {
    /// Expert up rows stored `row_major_b8` (stquant's default when rows are a multiple of 256
    /// values) give what the same blocks in plain rows give: each up matrix's product to float
    /// rounding, its rows decoded exactly, and the model's logits, batched and token by token
    /// (the decode path that splits experts across workers), to rounding at nine positions in
    /// ten. Streaming the experts through a small cache changes nothing, bit for bit.
    @Test(arguments: DotKernels.InstructionSet.supported)
    func blockGroupedUpRowsGiveThePlainRowResults(tier: DotKernels.InstructionSet) throws {
        let scratch = Scratch()
        let paths = try WideModel.packages(in: scratch)
        let grouped = try Model(path: paths.q4_0), plain = try Model(path: paths.plain, copyHotMatrices: false)
        let expert = grouped.layers[1].experts[3]
        #expect([expert.gate.layout, expert.up.layout, expert.down.layout] == [.rowMajorX8, .rowMajorB8, .rowMajor])
        let stored = try PackageReader(path: paths.q4_0), plainPackage = try PackageReader(path: paths.plain)
        #expect(stored.header.majorVersion == 3)
        // stquant on a Q4_0 package rearranges the same blocks both ways, byte for byte.
        for (source, grouped, target) in [(paths.q4_0, false, plainPackage), (paths.plain, true, stored)] {
            let path = scratch.file("again-\(grouped).stpk")
            try Quantizer.write(
                try Quantizer.plan(
                    source: try PackageReader(path: source), policy: QuantizationPolicy(type: .q4_0, groupedLayouts: grouped)),
                to: path, overwrite: true, threads: 2)
            let again = try PackageReader(path: path)
            for t in target.manifest.tensors {
                #expect(
                    again.tensor(t.name)!.layout == t.layout && again.bytes(of: again.tensor(t.name)!).elementsEqual(target.bytes(of: t)),
                    "\(t.name)")
            }
        }
        let hidden = WideModel.hidden
        var g = KernelTests.Generator(state: 5)
        for count in [1, 3, 13] {
            let x = ActivationBatch(columns: hidden, capacity: count)
            x.setCount(count)
            for t in 0..<count { for i in 0..<hidden { x.row(t)[i] = g.next() * 2 } }
            for (a, b) in zip(grouped.layers, plain.layers) {
                for (u, v) in zip(a.experts.map(\.up), b.experts.map(\.up)) {
                    var y = [Float](repeating: 0, count: u.rows * count), z = y
                    DotKernels.with(tier) {
                        MatMul.multiply(u, x, into: &y, outputStride: u.rows, threads: 2)
                        MatMul.multiply(v, x, into: &z, outputStride: v.rows, threads: 2)
                    }
                    let worst = zip(y, z).map { abs($0 - $1) }.max()!, scale = z.map(abs).max()!
                    #expect(worst <= 1e-5 * scale, "\(u.name), \(count) rows: difference \(worst) in values up to \(scale)")
                }
            }
            var row = [Float](repeating: 0, count: hidden), plainRow = row
            for j in [0, 7, WideModel.ffn - 1] {
                expert.up.decodeRow(j, into: &row)
                plain.layers[1].experts[3].up.decodeRow(j, into: &plainRow)
                #expect(row == plainRow, "up row \(j) decodes to the stored values")
            }
        }
        let tokens = WideModel.tokens(40)
        for batched in [true, false] {
            QuantizedModelTests.expect(
                try TeacherForcing.layerByLayer(base: plain, other: grouped, tokens: tokens, kernels: tier, batched: batched),
                within: QuantizedModelTests.reordered, "\(batched ? "prompt" : "token by token") on \(tier.name)")
        }
        let streamed = try Model(path: paths.q4_0, arrangeExperts: false)
        let expected = try Session(model: streamed, contextLength: 64, threads: 2, kernels: tier).evaluate(tokens, allLogits: true)
        let session = try Session(
            model: streamed, contextLength: 64, threads: 2,
            memoryBudget: ExpertStreamingTests.budget(streamed, slots: WideModel.active + 1, context: 64), kernels: tier)
        #expect(session.expertCache != nil)
        #expect(try session.evaluate(tokens, allLogits: true) == expected, "streaming the experts changes the logits")
    }

    /// A `--tensor-type` override leaves down (or gate) in Q8_0 beside block-grouped up rows: the
    /// experts then take the generic paths (down rows added one by one; gate in plain rows),
    /// batched and token by token, and still give the plain-row package's logits to rounding.
    @Test(arguments: ["down", "gate"], DotKernels.InstructionSet.supported)
    func blockGroupedUpRowsBesideAnotherType(overridden: String, tier: DotKernels.InstructionSet) throws {
        let scratch = Scratch()
        let paths = try WideModel.packages(in: scratch, overrides: [("*.\(overridden)", .q8_0)])
        let grouped = try Model(path: paths.q4_0), plain = try Model(path: paths.plain, copyHotMatrices: false)
        let expert = grouped.layers[0].experts[5]
        let layouts: [TensorLayout] = overridden == "down" ? [.rowMajorX8, .rowMajorB8, .rowMajor] : [.rowMajor, .rowMajorB8, .rowMajor]
        #expect([expert.gate.layout, expert.up.layout, expert.down.layout] == layouts)
        #expect((overridden == "down" ? expert.down.dtype : expert.gate.dtype) == .q8_0)
        let tokens = WideModel.tokens(24)
        for batched in [true, false] {
            QuantizedModelTests.expect(
                try TeacherForcing.layerByLayer(base: plain, other: grouped, tokens: tokens, kernels: tier, batched: batched),
                within: QuantizedModelTests.reordered, "\(batched ? "prompt" : "token by token") on \(tier.name)")
        }
    }
}
