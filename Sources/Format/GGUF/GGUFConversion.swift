/// .stpk → GGUF for llama.cpp (`stconvert PACKAGE.stpk -o MODEL.gguf`).
///
/// Names, shapes and metadata are llama.cpp's. Every matrix is written in the type asked for
/// (`dtype`; nil keeps each tensor's) except what llama-quantize never quantises: norms, and the
/// routers (f32, as llama.cpp's converter writes them). Blocks are copied wherever llama.cpp's
/// orientation is ours; the expert down matrices, neuron-major here and hidden-major there, are
/// transposed: exactly for float types, by dequantising and quantising again for Q4_0 / Q8_0.
public enum GGUFExport {
    public struct Plan {
        public let metadata: [(String, GGUFValue)]
        public let tensors: [GGUFWriter.Tensor]
        /// What the export had to do that is not a copy (requantised down matrices).
        public let notes: [String]
        /// Names of the GGUF tensors whose blocks were made by quantising dequantised values again.
        public let requantized: [String]
        /// Of the tensor data; `general.alignment` says it unless it is GGUF's default 32.
        public let alignment: Int
    }

    /// - Parameter neuronMajorDown: store the down matrices as the package does, [hidden, ffn,
    ///   experts] (what the authors' PowerInfer converter can write; llama.cpp cannot run it): for tests.
    public static func plan(
        package: PackageReader, dtype: TensorDType?, forceLayout: Bool, neuronMajorDown: Bool = false,
        alignment: Int = GGUFModel.exportAlignment
    ) throws(FormatError) -> Plan {
        let c = package.manifest.config
        if let reason = GGUFModel.unsupportedLayout(c), !forceLayout {
            throw .invalidRequest(
                "\(package.path): \(reason); llama.cpp would compute another model. Pass --force-layout to export it anyway")
        }
        func entry(_ name: String) -> TensorEntry { package.tensor(name)! }
        let majority = dtype ?? entry(TensorNames.query(0)).dtype
        precondition(alignment >= 32 && alignment & (alignment - 1) == 0)
        var metadata = GGUFModel.metadata(
            c, fileType: GGUFModel.fileType(majority), name: String(package.path.split(separator: "/").last ?? "model"))
        var tensors: [GGUFWriter.Tensor] = [], notes: [String] = [], requantized: [String] = []
        if let tokenizer = package.fileContents("tokenizer.json") {
            metadata += try GGUFTokenizer.keys(
                tokenizerJSON: tokenizer, config: package.fileContents("tokenizer_config.json"), vocabulary: c.vocabSize, path: package.path
            )
        } else {
            // llama.cpp's way of saying "no vocabulary": it loads the model and runs token ids.
            metadata += [("tokenizer.ggml.model", .string("none")), ("\(GGUFModel.architecture).vocab_size", .uint32(UInt32(c.vocabSize)))]
            notes.append("the package has no tokenizer, so neither has the GGUF: llama.cpp runs it on token ids only")
        }
        if let bos = c.bosTokenID, !metadata.contains(where: { $0.0 == "tokenizer.ggml.bos_token_id" }) {
            metadata.append(("tokenizer.ggml.bos_token_id", .uint32(UInt32(bos))))
        }
        if let eos = c.eosTokenIDs.first, !metadata.contains(where: { $0.0 == "tokenizer.ggml.eos_token_id" }) {
            metadata.append(("tokenizer.ggml.eos_token_id", .uint32(UInt32(eos))))
        }

        /// The type a tensor is written in: norms and routers f32 (llama.cpp reads norms in f32
        /// only, and its converter writes routers so), the rest as asked.
        func target(_ e: TensorEntry) -> TensorDType {
            switch TensorNames.role(of: e.name) {
            case .norm, .router: return .f32
            default: return dtype ?? e.dtype
            }
        }
        func dense(_ name: String, layer: Int?) {
            let e = entry(name), type = target(e)
            tensors.append(
                GGUFWriter.Tensor(name: GGUFModel.denseName(name, layer: layer), dimensions: e.shape.reversed(), type: GGMLType(type)) {
                    (sink) throws(FormatError) in
                    try sink.append(bytes: GGUFExport.plain(package, e, as: type))
                })
        }
        dense(TensorNames.embedding, layer: nil)
        for n in 0..<c.layerCount {
            for name in [
                TensorNames.attentionNorm(n), TensorNames.query(n), TensorNames.key(n), TensorNames.value(n),
                TensorNames.attentionOutput(n),
                TensorNames.ffnNorm(n), TensorNames.router(n)
            ] {
                dense(name, layer: n)
            }
            let f = c.expertFFNSize, h = c.hiddenSize, experts = c.expertCount
            for (role, ours) in [("gate", TensorNames.expertGate), ("up", TensorNames.expertUp)] {
                let first = entry(ours(n, 0)), type = target(first)
                tensors.append(
                    GGUFWriter.Tensor(name: GGUFModel.stackedName(role, layer: n), dimensions: [h, f, experts], type: GGMLType(type)) {
                        (sink) throws(FormatError) in
                        for e in 0..<experts { try sink.append(bytes: GGUFExport.plain(package, entry(ours(n, e)), as: type)) }
                    })
            }
            let down = entry(TensorNames.expertDown(n, 0)), name = GGUFModel.stackedName("down", layer: n)
            var type = target(down)
            if neuronMajorDown {
                tensors.append(
                    GGUFWriter.Tensor(name: name, dimensions: [h, f, experts], type: GGMLType(type)) { (sink) throws(FormatError) in
                        for e in 0..<experts {
                            try sink.append(bytes: GGUFExport.plain(package, entry(TensorNames.expertDown(n, e)), as: type))
                        }
                    })
                continue
            }
            if f % type.blockSize != 0 {
                // llama.cpp's rows of this matrix are `ffn` values, not whole blocks: f16, as
                // llama-quantize falls back to.
                if n == 0 {
                    notes.append("the expert width \(f) is not a multiple of 32: the down matrices are f16 (llama-quantize's fallback)")
                }
                type = .f16
            }
            if type.isQuantized && down.dtype.isQuantized { requantized.append(name) }
            tensors.append(
                GGUFWriter.Tensor(name: name, dimensions: [f, h, experts], type: GGMLType(type)) { (sink) throws(FormatError) in
                    for e in 0..<experts {
                        try sink.append(bytes: GGUFExport.hiddenMajor(package, entry(TensorNames.expertDown(n, e)), as: type))
                    }
                })
        }
        dense(TensorNames.outputNorm, layer: nil)
        if !c.tieWordEmbeddings { dense(TensorNames.output, layer: nil) }
        if !requantized.isEmpty {
            notes.append(
                "requantised the expert down matrices of \(requantized.count) layers: their blocks run along the hidden size in "
                    + "this package and along the expert width in llama.cpp, so they were dequantised, transposed and quantised again "
                    + "(every other block is copied)")
        }
        if alignment == 32 {
            metadata.removeAll { $0.0 == "general.alignment" }
        } else {
            metadata = metadata.map { $0.0 == "general.alignment" ? ($0.0, .uint32(UInt32(alignment))) : $0 }
        }
        return Plan(metadata: metadata, tensors: tensors, notes: notes, requantized: requantized, alignment: alignment)
    }

    public static func write(
        _ plan: Plan, to destination: String, overwrite: Bool, progress: (Int, Int) -> Void = { _, _ in }
    ) throws(FormatError) {
        try GGUFWriter.write(
            metadata: plan.metadata, tensors: plan.tensors, alignment: plan.alignment, to: destination, overwrite: overwrite,
            progress: progress)
    }

    /// A tensor's values in plain rows of `type`: its bytes when that is its dtype, else
    /// dequantised and encoded (ggml's quantisers, bit for bit).
    static func plain(_ package: PackageReader, _ e: TensorEntry, as type: TensorDType) throws(FormatError) -> [UInt8] {
        let raw = package.bytes(of: e)
        // Read once: its mapped pages leave the resident set when done (an export of a 21B
        // package otherwise ends with the whole package resident).
        defer { package.mapping.release(raw) }
        if type == e.dtype {
            guard e.layout.isGrouped else { return Array(raw) }
            var out = [UInt8](repeating: 0, count: e.length)
            out.withUnsafeMutableBytes {
                e.layout.plainRows(raw.baseAddress!, into: $0.baseAddress!, rowBytes: e.length / e.rows, rowCount: e.rows)
            }
            return out
        }
        var floats = [Float](repeating: 0, count: e.elementCount)
        floats.withUnsafeMutableBufferPointer { package.decode(e, into: $0.baseAddress!) }
        return try TensorCodec.encoded(floats, as: type, tensor: e.name)
    }

    /// A neuron-major [ffn, hidden] down matrix as llama.cpp's [hidden, ffn] rows of `type`.
    static func hiddenMajor(_ package: PackageReader, _ e: TensorEntry, as type: TensorDType) throws(FormatError) -> [UInt8] {
        defer { package.mapping.release(package.bytes(of: e)) }
        return try Transpose.matrix(package.bytes(of: e), dtype: e.dtype, rows: e.shape[0], columns: e.shape[1], as: type, tensor: e.name)
    }
}

extension GGUFSink {
    mutating func append(bytes: [UInt8]) throws(FormatError) {
        let result: Result<Void, FormatError> = bytes.withUnsafeBytes { raw in Result { () throws(FormatError) in try append(raw) } }
        try result.get()
    }
}
