import Format

/// Collects an importance matrix, as `llama-imatrix` does: for each weight matrix, the sum over
/// calibration tokens of the square of each input column, and how many tokens it saw. Attention
/// matrices see every token (q, k and v the attention input rmsnorm(x) ⊙ attention_norm, the
/// output matrix the heads' outputs); an expert's gate and up matrices see the ffn-normed input of
/// the tokens routed to it, its down matrix their ReGLU activations relu(W_gate h) ⊙ (W_up h)
/// (before the mixture weight); the output matrix (the embedding, when tied) sees the final norm's
/// output. Routers stay
/// float and are not collected. Names follow our GGUF export (`ImportanceMatrix.source(of:)`).
///
/// Attach to a session, feed it text in chunks, read `matrix`. It observes through the session's
/// hooks; the experts then take paths that write their activations down (the same function,
/// computed without the fused one-token kernels).
public final class ImportanceCollector {
    public let session: Session
    private let config: ModelConfig
    /// Per layer: sums of squares (double, so long texts lose nothing) and token counts.
    private struct Layer {
        var attention: [Double], attentionOutput: [Double]
        var attentionTokens = 0
        var expertInput: [Double], activations: [Double]  // (experts, hidden), (experts, ffn)
        var expertTokens: [Int]
    }
    private var layers: [Layer]
    private var output: [Double]
    private var outputTokens = 0
    private var chunks = 0
    private var chunkSize = 0
    /// The current layer's expert input: (batch rows, hidden).
    private var expertInput: [Float] = []
    private var normed: [Float]

    public init(session: Session) {
        self.session = session
        let c = session.model.config
        config = c
        layers = Array(
            repeating: Layer(
                attention: Array(repeating: 0, count: c.hiddenSize), attentionOutput: Array(repeating: 0, count: c.queryWidth),
                expertInput: Array(repeating: 0, count: c.expertCount * c.hiddenSize),
                activations: Array(repeating: 0, count: c.expertCount * c.expertFFNSize),
                expertTokens: Array(repeating: 0, count: c.expertCount)), count: c.layerCount)
        output = Array(repeating: 0, count: c.hiddenSize)
        normed = Array(repeating: 0, count: c.hiddenSize)
        attach()
    }

    /// Tokens and chunks collected so far.
    public var tokens: Int { outputTokens }
    public var chunksCollected: Int { chunks }

    /// Runs `ids` through the session in chunks of `chunk` tokens, each from an empty context (as
    /// llama-imatrix evaluates its chunks; the last may be shorter), calling `progress` after each
    /// with the chunks done and their number.
    public func feed(_ ids: [Int], chunk: Int, progress: (_ done: Int, _ of: Int) -> Void = { _, _ in }) throws(EngineError) {
        guard !ids.isEmpty else { throw .emptyInput }
        guard chunk >= 1, chunk <= session.contextLength else { throw .inputTooLong(tokens: chunk, context: session.contextLength) }
        let count = (ids.count + chunk - 1) / chunk
        chunkSize = chunk
        for i in 0..<count {
            session.reset(sequence: 0)
            _ = try session.evaluate(Array(ids[i * chunk..<min(ids.count, (i + 1) * chunk)]))
            chunks += 1
            progress(i + 1, count)
        }
    }

    /// What has been collected, as llama.cpp's importance matrix of the model, naming `datasets`
    /// as its calibration files.
    public func matrix(datasets: [String]) -> ImportanceMatrix {
        let c = config
        var entries: [String: ImportanceMatrix.Entry] = [:]
        func add(_ tensor: String, columns: Int, sums: [Double], counts: [Int]) {
            guard let source = ImportanceMatrix.source(of: tensor) else { return }
            var entry = ImportanceMatrix.Entry(columns: columns, matrices: counts.count)
            entry.sums = sums.map { Float($0) }
            entry.counts = counts.map { Float($0) }
            entries[source.name] = entry
        }
        for (l, layer) in layers.enumerated() {
            for tensor in [TensorNames.query(l), TensorNames.key(l), TensorNames.value(l)] {
                add(tensor, columns: c.hiddenSize, sums: layer.attention, counts: [layer.attentionTokens])
            }
            add(TensorNames.attentionOutput(l), columns: c.queryWidth, sums: layer.attentionOutput, counts: [layer.attentionTokens])
            for tensor in [TensorNames.expertGate(l, 0), TensorNames.expertUp(l, 0)] {
                add(tensor, columns: c.hiddenSize, sums: layer.expertInput, counts: layer.expertTokens)
            }
            add(TensorNames.expertDown(l, 0), columns: c.expertFFNSize, sums: layer.activations, counts: layer.expertTokens)
        }
        // A tied embedding is also the output matrix: its rows multiply the final norm's output.
        add(c.tieWordEmbeddings ? TensorNames.embedding : TensorNames.output, columns: c.hiddenSize, sums: output, counts: [outputTokens])
        return ImportanceMatrix(entries: entries, datasets: datasets, chunkCount: chunks, chunkSize: chunkSize)
    }

    /// sums[i] += x[i]² for each of the rows (`columns` floats each) of `values` listed in
    /// `rows` (all of them when nil).
    private static func addSquares(
        _ values: UnsafeBufferPointer<Float>, columns: Int, rows: UnsafeBufferPointer<Int>? = nil,
        into sums: UnsafeMutablePointer<Double>
    ) {
        let count = rows?.count ?? values.count / columns
        for r in 0..<count {
            let row = values.baseAddress! + (rows?[r] ?? r) * columns
            for i in 0..<columns {
                let v = Double(row[i])
                sums[i] += v * v
            }
        }
    }

    private func attach() {
        session.attentionHook = { [unowned self] layer, stage, values in observeAttention(layer: layer, stage: stage, values: values) }
        session.expertInputHook = { [unowned self] _, _, input in
            expertInput.removeAll(keepingCapacity: true)
            expertInput.append(contentsOf: input)
        }
        session.expertActivationHook = { [unowned self] layer, expert, rows, activations in
            observeExpert(layer: layer, expert: expert, rows: rows, activations: activations)
        }
        session.residualHook = { [unowned self] layer, _, residual in
            if layer == config.layerCount { observeFinal(UnsafeBufferPointer(residual)) }
        }
    }

    private func observeAttention(layer l: Int, stage: Session.AttentionStage, values: UnsafeBufferPointer<Float>) {
        let c = config
        switch stage {
        case .input:
            layers[l].attention.withUnsafeMutableBufferPointer { Self.addSquares(values, columns: c.hiddenSize, into: $0.baseAddress!) }
            layers[l].attentionTokens += values.count / c.hiddenSize
        case .output:
            layers[l].attentionOutput.withUnsafeMutableBufferPointer {
                Self.addSquares(values, columns: c.queryWidth, into: $0.baseAddress!)
            }
        }
    }

    private func observeExpert(layer l: Int, expert e: Int, rows: UnsafeBufferPointer<Int>, activations: UnsafeBufferPointer<Float>) {
        let hidden = config.hiddenSize, ffn = config.expertFFNSize
        layers[l].expertTokens[e] += rows.count
        expertInput.withUnsafeBufferPointer { input in
            layers[l].expertInput.withUnsafeMutableBufferPointer {
                Self.addSquares(input, columns: hidden, rows: rows, into: $0.baseAddress! + e * hidden)
            }
        }
        layers[l].activations.withUnsafeMutableBufferPointer {
            Self.addSquares(activations, columns: ffn, into: $0.baseAddress! + e * ffn)
        }
    }

    private func observeFinal(_ residual: UnsafeBufferPointer<Float>) {
        let hidden = config.hiddenSize
        normed.withUnsafeMutableBufferPointer { normed in
            output.withUnsafeMutableBufferPointer { sums in
                for t in 0..<residual.count / hidden {
                    session.rmsNorm(residual.baseAddress! + t * hidden, session.model.outputNorm, into: normed.baseAddress!)
                    Self.addSquares(UnsafeBufferPointer(normed), columns: hidden, into: sums.baseAddress!)
                }
            }
        }
        outputTokens += residual.count / hidden
    }
}
