/// GGUF (llama.cpp's `smallthinker` architecture) → .stpk (`stconvert MODEL.gguf -o OUT.stpk`).
///
/// The stacked expert tensors are cut into per-expert bundles; blocks are copied bit for bit
/// wherever the orientation allows (Q4_0 arranged in the runtime's grouped layouts on the way,
/// which moves blocks but changes none). llama.cpp stores expert down matrices hidden-major
/// ([hidden, ffn] per expert); the package stores them neuron-major, so float ones are
/// transposed exactly and quantised ones are dequantised, transposed and quantised again, which
/// the plan's notes and the package's provenance record. A down tensor already neuron-major (the
/// authors' PowerInfer converter can write it so: dimensions [hidden, ffn, experts]) is copied.
///
/// Block formats the package does not hold (`llama-quantize`'s K-quants and the others of its
/// common presets) are decoded as ggml decodes them and stored as a package type: the one asked
/// for, else `defaultType(for:)`. Asked for a type, every weight matrix is stored as it (norms
/// and routers keep their float type).
public enum GGUFImport {
    public struct Plan: Sendable {
        public let gguf: GGUFFile
        public let manifest: PackageManifest
        public let dataOffset: Int
        public var outputSize: Int { PackageLayout.fileLength(of: manifest, dataOffset: dataOffset) }
        /// Package tensor → (GGUF tensor, expert index within a stacked one, or nil).
        let sources: [String: (tensor: GGUFTensor, expert: Int?)]
        /// Down tensors stored hidden-major in the GGUF (transposed on the way).
        let hiddenMajorDown: Bool
        let files: [(name: String, bytes: [UInt8])]
        /// What the import inferred or could not copy.
        public let notes: [String]
        /// Tensors re-encoded from another type: how many, for each source and package type.
        public let conversions: [Conversion: Int]
        /// Weights the Q4_0 blocks of re-encoded tensors (those it has entries for).
        public var importance: ImportanceMatrix?
    }

    /// Tensors of GGUF type `source` stored as package type `target`.
    public struct Conversion: Hashable, Sendable, CustomStringConvertible {
        public let source: GGMLType
        public let target: TensorDType
        public var description: String { "\(source.name) → \(target.rawValue)" }
    }

    /// What re-encoding cost: for each conversion, the round-trip error of the package's values
    /// against the GGUF's decoded ones.
    public struct WriteSummary: Sendable {
        public var errors: [Conversion: QuantizationError] = [:]
    }

    /// The package type for blocks the package does not hold: q4_0 (4.5 bits a value) for those
    /// of 4.5 bits or fewer, q8_0 (8.5 bits) for the wider ones, which q4_0 would lose most of
    /// what their extra bits keep. (Measured on the trained example: README, "Importing GGUF".)
    public static func defaultType(for source: GGMLType) -> TensorDType {
        if let type = source.packageType { return type }
        return source.bitsPerValue <= 4.5 ? .q4_0 : .q8_0
    }

    /// - Parameter type: the package type for every weight matrix; nil keeps the types the
    ///   package holds and stores the others as `defaultType(for:)`.
    public static func plan(_ gguf: GGUFFile, type: TensorDType? = nil) throws(FormatError) -> Plan {
        let m = gguf.metadata
        func bad(_ defect: GGUFDefect, _ detail: String) -> FormatError { .malformedGGUF(path: gguf.path, defect: defect, detail: detail) }
        guard let arch = m["general.architecture"]?.string else { throw bad(.missingKey, "general.architecture is missing") }
        guard arch == GGUFModel.architecture else {
            throw bad(.wrongArchitecture, "general.architecture is \(arch); this import reads llama.cpp's \(GGUFModel.architecture) models")
        }
        func int(_ key: String, default value: Int? = nil) throws(FormatError) -> Int {
            guard let v = m["\(arch).\(key)"] else {
                if let value { return value }
                throw bad(.missingKey, "\(arch).\(key) is missing")
            }
            // llama.cpp allows per-layer arrays for some keys; a uniform one is a single value.
            if let items = v.array, let first = items.first?.int, items.allSatisfy({ $0.int == first }) { return first }
            guard let n = v.int, n > 0 else { throw bad(.invalidValue, "\(arch).\(key) is \(v); expected a positive integer") }
            return n
        }
        func double(_ key: String, default value: Double) throws(FormatError) -> Double {
            guard let v = m["\(arch).\(key)"] else { return value }
            guard let d = v.double, d.isFinite, d > 0 else {
                throw bad(.invalidValue, "\(arch).\(key) is \(v); expected a positive number")
            }
            // A float32 key holds the float nearest the config's decimal: take that decimal back.
            if case .float32(let f) = v { return Double("\(f)") ?? d }
            return d
        }
        guard let embedding = gguf.tensor("token_embd.weight"), embedding.dimensions.count == 2 else {
            throw bad(.missingTensor, "token_embd.weight is missing or not a matrix")
        }
        let layers = try int("block_count"), hidden = try int("embedding_length"), heads = try int("attention.head_count")
        // Checked before anything is sized by it (the config's own checks come later).
        guard layers <= ModelConfig.limits.layers else {
            throw bad(.invalidValue, "\(arch).block_count is \(layers); at most \(ModelConfig.limits.layers) layers are supported")
        }
        let kvHeads = try int("attention.head_count_kv", default: heads)
        let headDim = try int("attention.key_length", default: heads > 0 ? hidden / heads : 0)
        let experts = try int("expert_count"), active = try int("expert_used_count")
        let ffn = try int("expert_feed_forward_length", default: try int("feed_forward_length"))
        let gating = try int("expert_gating_func")
        guard gating == 1 || gating == 2 else {
            throw bad(.invalidValue, "\(arch).expert_gating_func is \(gating); expected 1 (softmax) or 2 (sigmoid)")
        }
        let window = m["\(arch).attention.sliding_window"]?.int ?? 0
        let layouts = GGUFModel.llamaLayouts(layers: layers, windowed: window > 0)
        var notes = [
            window > 0
                ? "per-layer layouts inferred by llama.cpp's rule for a sliding-window file: layers 0, 4, 8, … global without RoPE, "
                    + "the others RoPE with a window of \(window)"
                    + (window == GGUFModel.llamaWindow ? "" : " (llama.cpp itself would run them with \(GGUFModel.llamaWindow))")
                : "per-layer layouts inferred by llama.cpp's rule for a file without a sliding window: every layer global with RoPE"
        ]
        let vocabulary = embedding.dimensions[1]
        let tied = gguf.tensor("output.weight") == nil
        var eos: [Int] = []
        if let id = m["tokenizer.ggml.eos_token_id"]?.int { eos.append(id) }
        // Our exports add the config's other end-of-sequence ids (GGUF's key holds one).
        for id in m[GGUFModel.eosTokenIDsKey]?.array?.compactMap(\.int) ?? [] where !eos.contains(id) { eos.append(id) }
        let weightDtype: String? =
            switch type.map(GGMLType.init) ?? embedding.type {
            case .f32: "float32"
            case .f16: "float16"
            case .bf16: "bfloat16"
            default: nil
            }
        let torchDtype = m[GGUFModel.torchDtypeKey]?.string ?? weightDtype
        let config = ModelConfig(
            layerCount: layers, hiddenSize: hidden, attentionHeads: heads, kvHeads: kvHeads, headDim: headDim,
            expertCount: experts, activeExperts: active, expertFFNSize: ffn, routerSoftmax: gating == 1,
            ropeLayout: layouts.rope, ropeTheta: try double("rope.freq_base", default: 10_000),
            slidingWindowLayout: layouts.sliding, slidingWindowSize: window > 0 ? window : 4096,
            rmsNormEps: try double("attention.layer_norm_rms_epsilon", default: 1e-6), tieWordEmbeddings: tied, vocabSize: vocabulary,
            bosTokenID: m["tokenizer.ggml.bos_token_id"]?.int, eosTokenIDs: eos,
            maxPositionEmbeddings: try int("context_length"), torchDtype: torchDtype)
        // The config's own checks (limits, divisibility), as for a config.json.
        let checked: ModelConfig
        do {
            checked = try ModelConfig(json: config.json, source: gguf.path)
        } catch {
            throw bad(.invalidValue, "the metadata describe an impossible model: \(error)")
        }

        var planned: [PlannedTensor] = [], sources: [String: (tensor: GGUFTensor, expert: Int?)] = [:]
        var used = Set<String>()
        let policy = QuantizationPolicy(type: .q4_0)
        func take(_ name: String, dimensions: [Int]) throws(FormatError) -> GGUFTensor {
            guard let t = gguf.tensor(name) else { throw bad(.missingTensor, "\(name) is missing") }
            guard t.dimensions == dimensions else {
                throw bad(.wrongShape, "\(name) has dimensions \(t.dimensions); the metadata call for \(dimensions)")
            }
            used.insert(name)
            return t
        }
        // llama.cpp keeps norms and routers in f32 whatever the model's type; where their values
        // are exactly those of the embedding's float type, they go back to it (a package
        // exported from a bf16 model comes back bit for bit).
        let modelType = type ?? defaultType(for: embedding.type)
        var narrowed = 0
        var conversions: [Conversion: Int] = [:]
        func plan(_ e: ExpectedTensor, from t: GGUFTensor, expert: Int?) {
            let keeps = e.role == .norm || e.role == .router
            var dtype = keeps ? t.type.packageType ?? .f32 : type ?? defaultType(for: t.type)
            if t.type.packageType != dtype, expert == nil || expert == 0 {
                conversions[Conversion(source: t.type, target: dtype), default: 0] += 1
            }
            if dtype == .f32, modelType != .f32, !modelType.isQuantized, keeps,
                GGUFImport.exactly(gguf.bytes(of: t), as: modelType)
            {
                dtype = modelType
                narrowed += 1
            }
            let layout =
                e.layout == .transposed
                ? .transposed : policy.layout(name: e.name, dtype: dtype, shape: e.storedShape, orientation: .rowMajor)
            planned.append(
                PlannedTensor(name: e.name, sourceName: t.name, dtype: dtype, shape: e.storedShape, layout: layout, bundle: e.expert))
            sources[e.name] = (t, expert)
        }
        for e in TensorNames.denseTensors(checked) {
            let layer = Int(e.name.split(separator: ".").dropFirst().first ?? "")
            let name = GGUFModel.denseName(e.name, layer: e.name.hasPrefix("layers.") ? layer : nil)
            plan(e, from: try take(name, dimensions: e.storedShape.reversed()), expert: nil)
        }
        var hiddenMajor = true
        for n in 0..<layers {
            let gate = try take(GGUFModel.stackedName("gate", layer: n), dimensions: [hidden, ffn, experts])
            let up = try take(GGUFModel.stackedName("up", layer: n), dimensions: [hidden, ffn, experts])
            let downName = GGUFModel.stackedName("down", layer: n)
            guard let down = gguf.tensor(downName) else { throw bad(.missingTensor, "\(downName) is missing") }
            if down.dimensions == [ffn, hidden, experts] {
                hiddenMajor = true
            } else if down.dimensions == [hidden, ffn, experts] {
                hiddenMajor = false
            } else {
                throw bad(.wrongShape, "\(downName) has dimensions \(down.dimensions); expected [\(ffn), \(hidden), \(experts)]")
            }
            used.insert(downName)
            for x in 0..<experts {
                let bundle = TensorNames.expertTensors(checked, layer: n, expert: x)
                plan(bundle[0], from: gate, expert: x)
                plan(bundle[1], from: up, expert: x)
                plan(bundle[2], from: down, expert: x)
            }
        }
        if narrowed > 0 {
            notes.append(
                "\(narrowed) norms and routers stored f32 in the GGUF hold \(modelType.rawValue) values exactly: stored "
                    + "\(modelType.rawValue)"
            )
        }
        if let extra = gguf.tensors.first(where: { !used.contains($0.name) }) {
            throw bad(.unexpectedTensor, "\(extra.name) is not part of a SmallThinker model")
        }
        let downType = gguf.tensor(GGUFModel.stackedName("down", layer: 0))!.type
        let downTarget = type ?? defaultType(for: downType)
        if !hiddenMajor {
            notes.append("the expert down matrices are stored neuron-major already (a PowerInfer GGUF): copied")
        } else if downTarget.isQuantized {
            notes.append(
                "requantised the expert down matrices (\(downType.name) to \(downTarget.rawValue)): their blocks run along the expert width in the GGUF and "
                    + "along the hidden size in the package, so they were dequantised, transposed and quantised again")
        }
        var files: [(name: String, bytes: [UInt8])] = []
        if let model = m["tokenizer.ggml.model"]?.string, model != "none", model != "no_vocab" {
            let tokenizer = try GGUFTokenizer.files(gguf)
            files = [(name: "tokenizer.json", bytes: tokenizer.tokenizer), (name: "tokenizer_config.json", bytes: tokenizer.config)]
        } else {
            notes.append("the GGUF has no tokenizer: the package runs on token ids only")
        }
        var provenance = JSONObject()
        provenance["converter"] = .string("stconvert \(PackageFormat.converterVersion)")
        provenance["source_files"] = .array([
            .object(
                JSONObject([("name", .string(String(gguf.path.split(separator: "/").last ?? ""))), ("size", .int(gguf.mapping.bytes.count))]
                ))
        ])
        provenance["source_format"] = .string("gguf")
        provenance["import_notes"] = .array(notes.map { .string($0) })
        if !conversions.isEmpty {
            provenance["import_conversions"] = .array(
                conversions.sorted { $0.key.description < $1.key.description }.map { .string("\($0.key): \($0.value) GGUF tensors") })
        }
        let (manifest, dataOffset) = try PackageLayout.plan(
            config: checked, tensors: planned, files: files.map { ($0.name, $0.bytes.count) }, provenance: provenance)
        return Plan(
            gguf: gguf, manifest: manifest, dataOffset: dataOffset, sources: sources, hiddenMajorDown: hiddenMajor, files: files,
            notes: notes, conversions: conversions, importance: nil)
    }

    /// Writes the package; returns what re-encoding cost. A decoded value that is not finite (a
    /// corrupt block's scale) is an error naming the tensor, and nothing is left at `destination`.
    @discardableResult
    public static func write(
        _ plan: Plan, to destination: String, overwrite: Bool, progress: (WriteProgress) -> Void = { _ in }
    ) throws(FormatError) -> WriteSummary {
        var summary = WriteSummary()
        let writer = try PackageWriter(destination: destination, manifest: plan.manifest, dataOffset: plan.dataOffset, overwrite: overwrite)
        for entry in plan.manifest.tensors {
            let (tensor, expert) = plan.sources[entry.name]!
            var bytes = plan.gguf.bytes(of: tensor)
            if let expert {
                let slice = tensor.length / tensor.dimensions[2]
                bytes = UnsafeRawBufferPointer(rebasing: bytes[expert * slice..<(expert + 1) * slice])
            }
            // Plain rows of blocks in the entry's grouped layout.
            func arranged(_ plain: UnsafeRawPointer) -> [UInt8] {
                var out = [UInt8](repeating: 0, count: entry.length)
                out.withUnsafeMutableBytes {
                    entry.layout.arrange(plain: plain, into: $0.baseAddress!, rowBytes: entry.length / entry.rows, rowCount: entry.rows)
                }
                return out
            }
            var data: [UInt8]
            if tensor.type.packageType != entry.dtype {
                // Decoded, (turned over,) encoded as the package type, (arranged).
                var floats = [Float](repeating: 0, count: entry.elementCount)
                floats.withUnsafeMutableBufferPointer {
                    tensor.type.decode(bytes.baseAddress!, count: entry.elementCount, into: $0.baseAddress!)
                }
                if let bad = floats.firstIndex(where: { !$0.isFinite }) {
                    throw .malformedGGUF(
                        path: plan.gguf.path, defect: .invalidValue,
                        detail: "tensor \(tensor.name) decodes to \(floats[bad]) (\(tensor.type.name) block \(bad / tensor.type.blockSize)"
                            + (expert.map { " of expert \($0)" } ?? "") + "): a corrupt block scale")
                }
                if entry.layout == .transposed && plan.hiddenMajorDown {
                    var turned = floats
                    floats.withUnsafeBytes { f in
                        turned.withUnsafeMutableBytes {
                            Transpose.elements(
                                f.baseAddress!, rows: entry.shape[1], columns: entry.shape[0], elementSize: 4, into: $0.baseAddress!)
                        }
                    }
                    floats = turned
                }
                if entry.dtype == .q4_0, let e = plan.importance?.entries[tensor.name], (expert ?? 0) < e.matrices {
                    let weights = try e.weights(
                        matrix: expert ?? 0, rows: entry.shape[0], rowLength: entry.shape[1],
                        neuronMajor: entry.layout == .transposed, name: tensor.name, tensor: entry.name)
                    data = [UInt8](repeating: 0, count: entry.length)
                    floats.withUnsafeBufferPointer { f in
                        weights.withUnsafeBufferPointer { w in
                            data.withUnsafeMutableBytes {
                                Q4_0.quantize(
                                    f.baseAddress!, rows: entry.shape[0], rowLength: entry.shape[1], importance: w.baseAddress!,
                                    into: $0.baseAddress!)
                            }
                        }
                    }
                } else {
                    data = try TensorCodec.encoded(floats, as: entry.dtype, tensor: entry.name)
                }
                let conversion = Conversion(source: tensor.type, target: entry.dtype)
                if plan.conversions[conversion] != nil {
                    var back = [Float](repeating: 0, count: floats.count)
                    back.withUnsafeMutableBufferPointer { b in
                        data.withUnsafeBytes {
                            TensorCodec.decode($0.baseAddress!, dtype: entry.dtype, count: b.count, into: b.baseAddress!)
                        }
                    }
                    summary.errors[conversion, default: QuantizationError()].add(values: floats, decoded: back, count: floats.count)
                }
                if entry.layout.isGrouped { data = data.withUnsafeBytes { arranged($0.baseAddress!) } }
            } else if entry.layout == .transposed && plan.hiddenMajorDown {
                // One expert's [hidden, ffn] rows as the package's [ffn, hidden].
                data = try Transpose.matrix(
                    bytes, dtype: entry.dtype, rows: entry.shape[1], columns: entry.shape[0], as: entry.dtype, tensor: entry.name)
            } else if entry.layout.isGrouped {
                data = arranged(bytes.baseAddress!)
            } else {
                data = Array(bytes)
            }
            try writer.writeTensor(entry.name) { (sink) throws(FormatError) in
                let result: Result<Void, FormatError> = data.withUnsafeBytes { raw in
                    Result { () throws(FormatError) in try sink.append(raw) }
                }
                try result.get()
            }
            progress(writer.progress)
        }
        for file in plan.files { try writer.writeFile(file.name, contents: file.bytes) }
        try writer.finish()
        progress(writer.progress)
        return summary
    }

    /// Whether f32 values are exactly values of `dtype`.
    static func exactly(_ bytes: UnsafeRawBufferPointer, as dtype: TensorDType) -> Bool {
        let count = bytes.count / 4
        var floats = [Float](repeating: 0, count: count), back = floats
        var narrow = [UInt8](repeating: 0, count: count * dtype.blockBytes)
        floats.withUnsafeMutableBufferPointer { TensorCodec.decode(bytes.baseAddress!, dtype: .f32, count: count, into: $0.baseAddress!) }
        let overflow = floats.withUnsafeBufferPointer { f in
            narrow.withUnsafeMutableBytes { TensorCodec.encode(f.baseAddress!, count: count, as: dtype, into: $0.baseAddress!) }
        }
        guard overflow == nil else { return false }
        back.withUnsafeMutableBufferPointer { b in
            narrow.withUnsafeBytes { TensorCodec.decode($0.baseAddress!, dtype: dtype, count: count, into: b.baseAddress!) }
        }
        return zip(floats, back).allSatisfy { $0.bitPattern == $1.bitPattern }
    }
}
