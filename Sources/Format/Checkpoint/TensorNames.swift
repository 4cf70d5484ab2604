/// What part of the model a tensor is; drives the quantisation policy and the readable summary.
public enum TensorRole: String, Sendable, CaseIterable {
    case embedding, norm, attention, router, expert, output
}

/// One tensor the model needs: its package name, its Hugging Face name, and how it is stored.
public struct ExpectedTensor: Sendable, Equatable {
    public let name: String
    public let sourceName: String
    /// Shape in the checkpoint, outermost first.
    public let sourceShape: [Int]
    public let layout: TensorLayout
    public let role: TensorRole
    /// For expert tensors: the layer and expert they belong to.
    public let expert: (layer: Int, expert: Int)?

    public var storedShape: [Int] {
        layout == .transposed ? [sourceShape[1], sourceShape[0]] : sourceShape
    }

    public static func == (a: ExpectedTensor, b: ExpectedTensor) -> Bool {
        a.name == b.name && a.sourceName == b.sourceName && a.sourceShape == b.sourceShape && a.layout == b.layout
    }
}

/// The tensor names of a SmallThinker checkpoint (as the Hugging Face checkpoints name them) and
/// of our packages (specs/FORMAT.md).
public enum TensorNames {
    public static let embedding = "token_embd"
    public static let outputNorm = "output_norm"
    public static let output = "output"

    public static func attentionNorm(_ layer: Int) -> String { "layers.\(layer).attn_norm" }
    public static func query(_ layer: Int) -> String { "layers.\(layer).attn_q" }
    public static func key(_ layer: Int) -> String { "layers.\(layer).attn_k" }
    public static func value(_ layer: Int) -> String { "layers.\(layer).attn_v" }
    public static func attentionOutput(_ layer: Int) -> String { "layers.\(layer).attn_output" }
    public static func ffnNorm(_ layer: Int) -> String { "layers.\(layer).ffn_norm" }
    public static func router(_ layer: Int) -> String { "layers.\(layer).router" }
    public static func expertGate(_ layer: Int, _ expert: Int) -> String { "layers.\(layer).experts.\(expert).gate" }
    public static func expertUp(_ layer: Int, _ expert: Int) -> String { "layers.\(layer).experts.\(expert).up" }
    public static func expertDown(_ layer: Int, _ expert: Int) -> String { "layers.\(layer).experts.\(expert).down" }

    /// Dense tensors in package order: embedding, then each layer's attention, norms and router,
    /// then the final norm and (untied) output head.
    public static func denseTensors(_ c: ModelConfig) -> [ExpectedTensor] {
        func t(_ name: String, _ source: String, _ shape: [Int], _ role: TensorRole) -> ExpectedTensor {
            ExpectedTensor(name: name, sourceName: source, sourceShape: shape, layout: .rowMajor, role: role, expert: nil)
        }
        var list = [t(embedding, "model.embed_tokens.weight", [c.vocabSize, c.hiddenSize], .embedding)]
        for n in 0..<c.layerCount {
            let p = "model.layers.\(n)."
            list += [
                t(attentionNorm(n), p + "input_layernorm.weight", [c.hiddenSize], .norm),
                t(query(n), p + "self_attn.q_proj.weight", [c.queryWidth, c.hiddenSize], .attention),
                t(key(n), p + "self_attn.k_proj.weight", [c.kvWidth, c.hiddenSize], .attention),
                t(value(n), p + "self_attn.v_proj.weight", [c.kvWidth, c.hiddenSize], .attention),
                t(attentionOutput(n), p + "self_attn.o_proj.weight", [c.hiddenSize, c.queryWidth], .attention),
                t(ffnNorm(n), p + "post_attention_layernorm.weight", [c.hiddenSize], .norm),
                t(router(n), p + "block_sparse_moe.primary_router.weight", [c.expertCount, c.hiddenSize], .router)
            ]
        }
        list.append(t(outputNorm, "model.norm.weight", [c.hiddenSize], .norm))
        if !c.tieWordEmbeddings {
            list.append(t(output, "lm_head.weight", [c.vocabSize, c.hiddenSize], .output))
        }
        return list
    }

    /// The three tensors of one expert bundle in bundle order: gate, up, down. All three are
    /// stored neuron-major, [ffn, hidden]; down is the transpose of the checkpoint's [hidden, ffn].
    public static func expertTensors(_ c: ModelConfig, layer: Int, expert: Int) -> [ExpectedTensor] {
        let p = "model.layers.\(layer).block_sparse_moe.experts.\(expert)."
        let pair = (layer: layer, expert: expert)
        return [
            ExpectedTensor(
                name: expertGate(layer, expert), sourceName: p + "gate.weight",
                sourceShape: [c.expertFFNSize, c.hiddenSize], layout: .rowMajor, role: .expert, expert: pair),
            ExpectedTensor(
                name: expertUp(layer, expert), sourceName: p + "up.weight",
                sourceShape: [c.expertFFNSize, c.hiddenSize], layout: .rowMajor, role: .expert, expert: pair),
            ExpectedTensor(
                name: expertDown(layer, expert), sourceName: p + "down.weight",
                sourceShape: [c.hiddenSize, c.expertFFNSize], layout: .transposed, role: .expert, expert: pair)
        ]
    }

    public static func all(_ c: ModelConfig) -> [ExpectedTensor] {
        var list = denseTensors(c)
        for layer in 0..<c.layerCount {
            for expert in 0..<c.expertCount { list += expertTensors(c, layer: layer, expert: expert) }
        }
        return list
    }

    /// The role of a package tensor, from its name.
    public static func role(of name: String) -> TensorRole {
        if name == embedding { return .embedding }
        if name == output { return .output }
        if name == outputNorm || name.hasSuffix(".attn_norm") || name.hasSuffix(".ffn_norm") { return .norm }
        if name.hasSuffix(".router") { return .router }
        if name.contains(".experts.") { return .expert }
        return .attention
    }
}
