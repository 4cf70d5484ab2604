/// SmallThinker in llama.cpp's GGUF vocabulary: its tensor names, its metadata keys, and the
/// per-layer layouts its port can represent.
public enum GGUFModel {
    public static let architecture = "smallthinker"
    /// Export aligns every tensor to a page, so each expert's slice of a stacked Q4_0 tensor
    /// (a whole number of pages at the 4B and 21B sizes) starts on one.
    public static let exportAlignment = 4096
    /// llama.cpp's port runs every sliding-window model with this window, whatever the file says.
    public static let llamaWindow = 4096

    /// Our exports' key for every end-of-sequence id of the config (GGUF's standard key holds one).
    public static let eosTokenIDsKey = "smallthinker.eos_token_ids"
    /// And the checkpoint's `torch_dtype` (the dtype it was trained in, kept through quantisation).
    public static let torchDtypeKey = "smallthinker.torch_dtype"

    /// llama.cpp's name for a dense package tensor.
    static func denseName(_ name: String, layer: Int?) -> String {
        switch name {
        case TensorNames.embedding: return "token_embd.weight"
        case TensorNames.outputNorm: return "output_norm.weight"
        case TensorNames.output: return "output.weight"
        default: break
        }
        let n = layer!
        let table = [
            TensorNames.attentionNorm(n): "attn_norm", TensorNames.query(n): "attn_q", TensorNames.key(n): "attn_k",
            TensorNames.value(n): "attn_v", TensorNames.attentionOutput(n): "attn_output", TensorNames.ffnNorm(n): "ffn_norm",
            TensorNames.router(n): "ffn_gate_inp"
        ]
        return "blk.\(n).\(table[name]!).weight"
    }

    static func stackedName(_ role: String, layer: Int) -> String { "blk.\(layer).ffn_\(role)_exps.weight" }

    /// The layouts llama.cpp infers for a file: with a sliding-window key, layers i % 4 == 0 global
    /// and without RoPE, the others windowed (4096) with RoPE; without one, every layer global with RoPE.
    static func llamaLayouts(layers: Int, windowed: Bool) -> (rope: [Bool], sliding: [Bool]) {
        guard windowed else { return (Array(repeating: true, count: layers), Array(repeating: false, count: layers)) }
        let periodic = (0..<layers).map { $0 % 4 != 0 }
        return (periodic, periodic)
    }

    /// Why llama.cpp would run `c` differently from its definition, or nil when it would not.
    public static func unsupportedLayout(_ c: ModelConfig) -> String? {
        let windowed = c.slidingWindowLayout.contains(true)
        let llama = llamaLayouts(layers: c.layerCount, windowed: windowed)
        if c.ropeLayout != llama.rope || c.slidingWindowLayout != llama.sliding {
            return windowed
                ? "llama.cpp's smallthinker port assumes NoPE global attention on every fourth layer from layer 0 and RoPE with a "
                    + "sliding window on the others; this model has RoPE layers \(c.ropeLayout.map { $0 ? 1 : 0 }) and sliding layers "
                    + "\(c.slidingWindowLayout.map { $0 ? 1 : 0 })"
                : "llama.cpp's smallthinker port applies RoPE on every layer of a model without sliding windows; this model has "
                    + "NoPE layers \(c.ropeLayout.enumerated().filter { !$0.element }.map(\.offset))"
        }
        if windowed && c.slidingWindowSize != llamaWindow {
            return "llama.cpp's smallthinker port runs every sliding-window layer with a window of \(llamaWindow); this model's is "
                + "\(c.slidingWindowSize)"
        }
        return nil
    }

    /// The metadata an export writes for `c` (llama.cpp's keys), tokenizer keys excluded.
    static func metadata(_ c: ModelConfig, fileType: UInt32, name: String) -> [(String, GGUFValue)] {
        let a = architecture
        var m: [(String, GGUFValue)] = [
            ("general.architecture", .string(a)),
            ("general.name", .string(name)),
            ("general.alignment", .uint32(UInt32(exportAlignment))),
            ("general.file_type", .uint32(fileType)),
            ("general.quantization_version", .uint32(2)),
            ("\(a).block_count", .uint32(UInt32(c.layerCount))),
            ("\(a).context_length", .uint32(UInt32(c.maxPositionEmbeddings))),
            ("\(a).embedding_length", .uint32(UInt32(c.hiddenSize))),
            ("\(a).feed_forward_length", .uint32(UInt32(c.expertFFNSize))),
            ("\(a).attention.head_count", .uint32(UInt32(c.attentionHeads))),
            ("\(a).attention.head_count_kv", .uint32(UInt32(c.kvHeads))),
            ("\(a).attention.key_length", .uint32(UInt32(c.headDim))),
            ("\(a).attention.value_length", .uint32(UInt32(c.headDim))),
            ("\(a).rope.freq_base", .float32(Float(c.ropeTheta))),
            ("\(a).attention.layer_norm_rms_epsilon", .float32(Float(c.rmsNormEps))),
            ("\(a).expert_count", .uint32(UInt32(c.expertCount))),
            ("\(a).expert_used_count", .uint32(UInt32(c.activeExperts))),
            ("\(a).expert_feed_forward_length", .uint32(UInt32(c.expertFFNSize))),
            ("\(a).expert_gating_func", .uint32(c.routerSoftmax ? 1 : 2))
        ]
        if c.slidingWindowLayout.contains(true) { m.append(("\(a).attention.sliding_window", .uint32(UInt32(c.slidingWindowSize)))) }
        if let dtype = c.torchDtype { m.append((torchDtypeKey, .string(dtype))) }
        if c.eosTokenIDs.count > 1 { m.append((eosTokenIDsKey, .array(4, c.eosTokenIDs.map { .uint32(UInt32($0)) }))) }
        return m
    }

    /// ggml's `llama_ftype` for a file whose 2-D weights are mostly `dtype`.
    static func fileType(_ dtype: TensorDType) -> UInt32 {
        switch dtype {
        case .f32: 0
        case .f16: 1
        case .q4_0: 2
        case .q8_0: 7
        case .bf16: 32
        }
    }
}
