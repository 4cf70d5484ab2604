/// The hyperparameters of a SmallThinker model: every value the forward pass needs, explicit.
///
/// Read from a Hugging Face `config.json` (where some keys may be missing and take the modeling
/// code's defaults) and written into packages in normalised form under the same key names, so a
/// package's config never depends on a default.
public struct ModelConfig: Sendable, Equatable {
    public var layerCount: Int  // num_hidden_layers
    public var hiddenSize: Int  // hidden_size
    public var attentionHeads: Int  // num_attention_heads
    public var kvHeads: Int  // num_key_value_heads
    public var headDim: Int  // head_dim
    public var expertCount: Int  // moe_num_primary_experts
    public var activeExperts: Int  // moe_num_active_primary_experts
    public var expertFFNSize: Int  // moe_ffn_hidden_size
    /// Router weights over the chosen experts: softmax of their logits when true, otherwise
    /// sigmoid(logit) normalised over the chosen. A missing key means false (sigmoid).
    public var routerSoftmax: Bool  // moe_primary_router_apply_softmax
    /// Per layer: true rotates q and k with RoPE, false is NoPE.
    public var ropeLayout: [Bool]  // rope_layout
    public var ropeTheta: Double  // rope_theta
    /// Per layer: true restricts attention to the last `slidingWindowSize` positions.
    public var slidingWindowLayout: [Bool]  // sliding_window_layout
    /// Keys a sliding-window query sees, itself included; 0 when no layer uses a window.
    public var slidingWindowSize: Int  // sliding_window_size
    public var rmsNormEps: Double  // rms_norm_eps
    public var tieWordEmbeddings: Bool  // tie_word_embeddings
    public var vocabSize: Int  // vocab_size
    public var bosTokenID: Int?  // bos_token_id
    public var eosTokenIDs: [Int]  // eos_token_id (an int or a list in config.json)
    public var maxPositionEmbeddings: Int  // max_position_embeddings
    /// The checkpoint's declared dtype, informational.
    public var torchDtype: String?  // torch_dtype

    /// Sanity limits: far above any real model, low enough that a corrupt value cannot make us
    /// allocate absurd amounts.
    public static let limits = (
        layers: 1024, hidden: 1 << 16, heads: 1024, headDim: 1024, experts: 4096,
        ffn: 1 << 18, vocab: 1 << 22, positions: 1 << 24
    )

    public init(
        layerCount: Int, hiddenSize: Int, attentionHeads: Int, kvHeads: Int, headDim: Int,
        expertCount: Int, activeExperts: Int, expertFFNSize: Int, routerSoftmax: Bool,
        ropeLayout: [Bool], ropeTheta: Double, slidingWindowLayout: [Bool], slidingWindowSize: Int,
        rmsNormEps: Double, tieWordEmbeddings: Bool, vocabSize: Int, bosTokenID: Int?,
        eosTokenIDs: [Int], maxPositionEmbeddings: Int, torchDtype: String? = nil
    ) {
        self.layerCount = layerCount
        self.hiddenSize = hiddenSize
        self.attentionHeads = attentionHeads
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.expertCount = expertCount
        self.activeExperts = activeExperts
        self.expertFFNSize = expertFFNSize
        self.routerSoftmax = routerSoftmax
        self.ropeLayout = ropeLayout
        self.ropeTheta = ropeTheta
        self.slidingWindowLayout = slidingWindowLayout
        self.slidingWindowSize = slidingWindowSize
        self.rmsNormEps = rmsNormEps
        self.tieWordEmbeddings = tieWordEmbeddings
        self.vocabSize = vocabSize
        self.bosTokenID = bosTokenID
        self.eosTokenIDs = eosTokenIDs
        self.maxPositionEmbeddings = maxPositionEmbeddings
        self.torchDtype = torchDtype
    }

    /// Reads a config object. `source` names the file in errors.
    public init(json: JSONValue, source: String) throws(FormatError) {
        func invalid(_ detail: String) -> FormatError { .invalidCheckpoint(path: source, defect: .invalidConfig, detail: detail) }
        guard let object = json.objectValue else { throw invalid("the config is not a JSON object") }
        if let modelType = object["model_type"], modelType.stringValue != "smallthinker" {
            throw .invalidCheckpoint(
                path: source, defect: .wrongModelType,
                detail: "model_type is \(JSONWriter.serialize(modelType)); expected \"smallthinker\"")
        } else if object["model_type"] == nil {
            throw .invalidCheckpoint(path: source, defect: .wrongModelType, detail: "model_type is missing; expected \"smallthinker\"")
        }
        func int(_ key: String, _ range: ClosedRange<Int>) throws(FormatError) -> Int {
            guard let value = object[key] else { throw invalid("\(key) is missing") }
            guard let number = value.intValue else { throw invalid("\(key) is \(JSONWriter.serialize(value)); expected an integer") }
            guard range.contains(number) else { throw invalid("\(key) is \(number); expected \(range.lowerBound)...\(range.upperBound)") }
            return number
        }
        func double(_ key: String) throws(FormatError) -> Double {
            guard let value = object[key] else { throw invalid("\(key) is missing") }
            guard let number = value.doubleValue, number.isFinite, number > 0 else {
                throw invalid("\(key) is \(JSONWriter.serialize(value)); expected a positive number")
            }
            return number
        }
        func bool(_ key: String, default defaultValue: Bool?) throws(FormatError) -> Bool {
            guard let value = object[key], !value.isNull else {
                guard let defaultValue else { throw invalid("\(key) is missing") }
                return defaultValue
            }
            guard let flag = value.boolValue else { throw invalid("\(key) is \(JSONWriter.serialize(value)); expected true or false") }
            return flag
        }
        let limits = ModelConfig.limits
        layerCount = try int("num_hidden_layers", 1...limits.layers)
        hiddenSize = try int("hidden_size", 1...limits.hidden)
        attentionHeads = try int("num_attention_heads", 1...limits.heads)
        kvHeads = try int("num_key_value_heads", 1...limits.heads)
        headDim = try int("head_dim", 1...limits.headDim)
        expertCount = try int("moe_num_primary_experts", 1...limits.experts)
        activeExperts = try int("moe_num_active_primary_experts", 1...limits.experts)
        expertFFNSize = try int("moe_ffn_hidden_size", 1...limits.ffn)
        routerSoftmax = try bool("moe_primary_router_apply_softmax", default: false)
        ropeTheta = try double("rope_theta")
        rmsNormEps = try double("rms_norm_eps")
        tieWordEmbeddings = try bool("tie_word_embeddings", default: true)
        vocabSize = try int("vocab_size", 1...limits.vocab)
        maxPositionEmbeddings = try int("max_position_embeddings", 1...limits.positions)
        torchDtype = object["torch_dtype"]?.stringValue

        let layers = layerCount
        func layout(_ key: String) throws(FormatError) -> [Bool] {
            guard let values = object[key]?.arrayValue else { throw invalid("\(key) is missing; expected a list of 0/1, one per layer") }
            var flags: [Bool] = []
            for value in values {
                switch value.intValue ?? (value.boolValue.map { $0 ? 1 : 0 }) {
                case 0: flags.append(false)
                case 1: flags.append(true)
                default: throw invalid("\(key) contains \(JSONWriter.serialize(value)); expected 0 or 1")
                }
            }
            guard flags.count == layers else {
                throw invalid("\(key) has \(flags.count) entries; expected \(layers) (num_hidden_layers)")
            }
            return flags
        }
        ropeLayout = try layout("rope_layout")
        slidingWindowLayout = try layout("sliding_window_layout")
        if slidingWindowLayout.contains(true) {
            slidingWindowSize = try int("sliding_window_size", 1...limits.positions)
        } else {
            slidingWindowSize = object["sliding_window_size"]?.intValue.map { max(0, $0) } ?? 0
        }

        if let bos = object["bos_token_id"], !bos.isNull {
            guard let id = bos.intValue, (0..<vocabSize).contains(id) else {
                throw invalid("bos_token_id is \(JSONWriter.serialize(bos)); expected a token id below vocab_size \(vocabSize)")
            }
            bosTokenID = id
        } else {
            bosTokenID = nil
        }
        switch object["eos_token_id"] {
        case nil, .null?:
            eosTokenIDs = []
        case .array(let values)?:
            eosTokenIDs = values.compactMap { $0.intValue }
            guard eosTokenIDs.count == values.count else { throw invalid("eos_token_id must be an integer or a list of integers") }
        case let value?:
            guard let id = value.intValue else { throw invalid("eos_token_id must be an integer or a list of integers") }
            eosTokenIDs = [id]
        }
        if let bad = eosTokenIDs.first(where: { !(0..<vocabSize).contains($0) }) {
            throw invalid("eos_token_id \(bad) is not below vocab_size \(vocabSize)")
        }

        guard attentionHeads % kvHeads == 0 else {
            throw invalid("num_attention_heads \(attentionHeads) is not a multiple of num_key_value_heads \(kvHeads)")
        }
        guard activeExperts <= expertCount else {
            throw invalid("moe_num_active_primary_experts \(activeExperts) exceeds moe_num_primary_experts \(expertCount)")
        }
        if ropeLayout.contains(true) && headDim % 2 != 0 {
            throw invalid("head_dim \(headDim) is odd, but RoPE rotates pairs of dimensions")
        }
    }

    /// The normalised config, under Hugging Face key names.
    public var json: JSONValue {
        var object = JSONObject()
        object["model_type"] = .string("smallthinker")
        object["num_hidden_layers"] = .int(layerCount)
        object["hidden_size"] = .int(hiddenSize)
        object["num_attention_heads"] = .int(attentionHeads)
        object["num_key_value_heads"] = .int(kvHeads)
        object["head_dim"] = .int(headDim)
        object["moe_num_primary_experts"] = .int(expertCount)
        object["moe_num_active_primary_experts"] = .int(activeExperts)
        object["moe_ffn_hidden_size"] = .int(expertFFNSize)
        object["moe_primary_router_apply_softmax"] = .bool(routerSoftmax)
        object["rope_layout"] = .array(ropeLayout.map { .int($0 ? 1 : 0) })
        object["rope_theta"] = .double(ropeTheta)
        object["sliding_window_layout"] = .array(slidingWindowLayout.map { .int($0 ? 1 : 0) })
        object["sliding_window_size"] = .int(slidingWindowSize)
        object["rms_norm_eps"] = .double(rmsNormEps)
        object["tie_word_embeddings"] = .bool(tieWordEmbeddings)
        object["vocab_size"] = .int(vocabSize)
        object["bos_token_id"] = bosTokenID.map { .int($0) } ?? .null
        object["eos_token_id"] = .array(eosTokenIDs.map { .int($0) })
        object["max_position_embeddings"] = .int(maxPositionEmbeddings)
        if let torchDtype { object["torch_dtype"] = .string(torchDtype) }
        return .object(object)
    }

    public var groupSize: Int { attentionHeads / kvHeads }
    public var queryWidth: Int { attentionHeads * headDim }
    public var kvWidth: Int { kvHeads * headDim }
}
