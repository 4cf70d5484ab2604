import Dispatch

/// Round-trip error of one tensor (or a group of them), in the tensor's own units.
public struct QuantizationError: Sendable {
    public var count = 0
    public var sumSquaredError = 0.0
    public var sumSquaredValue = 0.0
    public var maxAbsoluteError: Float = 0

    public init() {}

    public var rmse: Double { count > 0 ? (sumSquaredError / Double(count)).squareRoot() : 0 }
    /// RMS error relative to the RMS value: comparable across tensors of different scales.
    public var relativeRMSE: Double { sumSquaredValue > 0 ? (sumSquaredError / sumSquaredValue).squareRoot() : 0 }

    /// Adds the error of `decoded` against `values` (`count` of each).
    mutating func add(values: UnsafePointer<Float>, decoded: UnsafePointer<Float>, count: Int) {
        self.count += count
        for i in 0..<count {
            let diff = decoded[i] - values[i]
            sumSquaredError += Double(diff * diff)
            sumSquaredValue += Double(values[i] * values[i])
            maxAbsoluteError = max(maxAbsoluteError, abs(diff))
        }
    }

    mutating func merge(_ other: QuantizationError) {
        count += other.count
        sumSquaredError += other.sumSquaredError
        sumSquaredValue += other.sumSquaredValue
        maxAbsoluteError = max(maxAbsoluteError, other.maxAbsoluteError)
    }
}

/// A quantisation, planned: what `stquant --dry-run` shows and `Quantizer.write` executes.
public struct QuantizationPlan: Sendable {
    public let source: any TensorSource
    public let manifest: PackageManifest
    public let dataOffset: Int
    /// Output tensor name → decision.
    public let decisions: [String: QuantizationPolicy.Decision]
    public let policy: QuantizationPolicy
    public var outputSize: Int { PackageLayout.fileLength(of: manifest, dataOffset: dataOffset) }
    /// With an importance matrix: each weighted Q4_0 tensor's importances, one per value of a
    /// row; and the Q4_0 tensors the matrix has nothing for (quantised plainly).
    public let importance: [String: [Float]]
    public let unweighted: [String]
    /// With `routerAware`: the Q4_0 tensors quantised with error feedback, and the factor each
    /// takes (`Q4_0.quantize(_:rows:rowLength:compensation:into:)`).
    public let compensation: [String: [Double]]
}

public struct QuantizationReport: Sendable {
    public struct Tensor: Sendable {
        public var name: String
        public var role: TensorRole
        public var from: TensorDType
        public var to: TensorDType
        public var elements: Int
        public var bytesBefore: Int
        public var bytesAfter: Int
        public var error: QuantizationError
    }
    public var sizeBefore: Int
    public var sizeAfter: Int
    public var tensors: [Tensor]
    public var seconds: Double

    /// Stored bits per weight over all tensors.
    public var bitsPerWeight: Double {
        let elements = tensors.reduce(0) { $0 + $1.elements }
        return Double(tensors.reduce(0) { $0 + $1.bytesAfter } * 8) / Double(max(elements, 1))
    }

    public func byRole() -> [(role: TensorRole, tensors: Int, dtypes: [TensorDType], error: QuantizationError)] {
        TensorRole.allCases.compactMap { role in
            let group = tensors.filter { $0.role == role }
            guard !group.isEmpty else { return nil }
            var error = QuantizationError()
            for t in group { error.merge(t.error) }
            return (role, group.count, Array(Set(group.map(\.to))).sorted { $0.rawValue < $1.rawValue }, error)
        }
    }
}

/// Float package (or a planned checkpoint conversion) → quantised package, keeping the
/// storage-optimised layout.
public enum Quantizer {
    public static func plan(source: any TensorSource, policy: QuantizationPolicy) throws(FormatError) -> QuantizationPlan {
        guard policy.type.isQuantized else {
            throw .invalidRequest("--type must be q4_0 or q8_0 (got \(policy.type.rawValue)); stconvert --dtype writes float types")
        }
        var decisions: [String: QuantizationPolicy.Decision] = [:]
        var planned: [PlannedTensor] = []
        let bundleOf = source.manifest.bundleOfTensor
        for t in source.manifest.tensors {
            let decision = policy.decide(t)
            if t.dtype.isQuantized && decision.dtype != t.dtype && !policy.allowRequantize {
                throw .invalidRequest(
                    "tensor \(t.name) is already \(t.dtype.rawValue); quantising it again to \(decision.dtype.rawValue) compounds the "
                        + "error. Quantise the float package instead, or pass --allow-requantize"
                )
            }
            decisions[t.name] = decision
            let layout = policy.layout(name: t.name, dtype: decision.dtype, shape: t.shape, orientation: t.layout.orientation)
            planned.append(
                PlannedTensor(
                    name: t.name, sourceName: t.sourceName, dtype: decision.dtype, shape: t.shape,
                    layout: layout, bundle: bundleOf[t.name].map { ($0.layer, $0.expert) }))
        }
        var (importance, unweighted) = try resolveImportance(source: source, policy: policy, decisions: decisions)
        let compensation = try routerCompensation(source: source, policy: policy, decisions: decisions)
        for name in compensation.keys {
            importance[name] = nil
            unweighted.removeAll { $0 == name }
        }
        var provenance = source.manifest.provenance
        var quantization = JSONObject()
        if let matrix = policy.importance {
            quantization["imatrix"] = .object(
                JSONObject([
                    ("datasets", .array(matrix.datasets.map { .string($0) })), ("chunk_count", .int(matrix.chunkCount)),
                    ("chunk_size", .int(matrix.chunkSize)), ("weighted_tensors", .int(importance.count)),
                    ("unweighted_tensors", .int(unweighted.count))
                ]))
        }
        if !compensation.isEmpty {
            quantization["router_aware"] = .object(
                JSONObject([
                    ("tensors", .array(compensation.keys.sorted().map { .string($0) })),
                    ("routers", .int(source.manifest.config.layerCount))
                ]))
        }
        quantization["tool"] = .string("stquant \(PackageFormat.converterVersion)")
        quantization["type"] = .string(policy.type.rawValue)
        if let e = policy.embeddingType { quantization["embedding_type"] = .string(e.rawValue) }
        if let o = policy.outputType { quantization["output_type"] = .string(o.rawValue) }
        quantization["q4_0_rows"] = .string(
            policy.groupedLayouts ? "row_major_x8; expert up row_major_b8 where rows are a multiple of 256 values" : "row_major")
        if !policy.overrides.isEmpty {
            quantization["tensor_types"] = .array(policy.overrides.map { .string("\($0.pattern)=\($0.type.rawValue)") })
        }
        quantization[source is ConversionSource ? "source_checkpoint" : "source_package"] = .object(
            JSONObject([
                ("name", .string(Checkpoint.baseName(source.path))), ("size", .int(source.sourceBytes))
            ]))
        provenance["quantization"] = .object(quantization)
        let files = source.manifest.files.map { (name: $0.name, length: $0.length) }
        let (manifest, dataOffset) = try PackageLayout.plan(
            config: source.manifest.config, tensors: planned, files: files, provenance: provenance)
        return QuantizationPlan(
            source: source, manifest: manifest, dataOffset: dataOffset, decisions: decisions, policy: policy, importance: importance,
            unweighted: unweighted, compensation: compensation)
    }

    /// With `routerAware`, the factor for a Q4_0 token embedding. The embedding row of each token
    /// starts the residual stream, which every layer's router reads raw (before any norm), and
    /// a model whose router logits sit close to ties moves experts on a small change of it: on
    /// the trained fixture nine tenths of Q4_0's loss is the embedding's, in that role. So its
    /// rounding error e is kept small in eᵀ H e, H = G / mean(diag G) + I with G = Σ_l R_lᵀ R_l
    /// over the routers R_l (what e moves the router logits by, squared, summed over layers),
    /// the identity keeping the plain squared error (what the norms and attention see) in
    /// equal measure. Measured there: mean KL 0.0335 → 0.022 with the importance matrix for the rest.
    static func routerCompensation(
        source: any TensorSource, policy: QuantizationPolicy, decisions: [String: QuantizationPolicy.Decision]
    ) throws(FormatError) -> [String: [Double]] {
        guard policy.routerAware else { return [:] }
        guard decisions[TensorNames.embedding]?.dtype == .q4_0 else {
            throw .invalidRequest(
                "--router-aware chooses the token embedding's Q4_0 blocks, and this plan stores it as "
                    + "\(decisions[TensorNames.embedding]?.dtype.rawValue ?? "nothing"): give it q4_0 (--embedding-type q4_0)")
        }
        let c = source.manifest.config, n = c.hiddenSize
        var gram = [Double](repeating: 0, count: n * n)
        for layer in 0..<c.layerCount {
            let router = try floats(of: TensorNames.router(layer), from: source)
            let experts = router.count / n
            router.withUnsafeBufferPointer { r in
                gram.withUnsafeMutableBufferPointer { g in
                    for e in 0..<experts {
                        let row = r.baseAddress! + e * n
                        for i in 0..<n {
                            let a = Double(row[i])
                            guard a != 0 else { continue }
                            for j in 0..<n { g[i * n + j] += a * Double(row[j]) }
                        }
                    }
                }
            }
        }
        let mean = (0..<n).reduce(0.0) { $0 + gram[$1 * n + $1] } / Double(n)
        for i in 0..<n {
            for j in 0..<n { gram[i * n + j] = (mean > 0 ? gram[i * n + j] / mean : 0) + (i == j ? 1 : 0) }
        }
        guard let factor = Q4_0.compensationFactor(gram, n: n) else {
            throw .invalidRequest("--router-aware: the routers' Gram matrix is not finite (the routers hold NaN or infinity)")
        }
        return [TensorNames.embedding: factor]
    }

    /// All of tensor `name` of `source` as float32, rows in plain order (`PackageReader.decode`
    /// for any source).
    static func floats(of name: String, from source: any TensorSource) throws(FormatError) -> [Float] {
        guard let t = source.tensor(name) else { throw .invalidRequest("the package has no \(name)") }
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, t.length), alignment: 64)
        defer { bytes.deallocate() }
        try source.read(t, from: 0, into: UnsafeMutableRawBufferPointer(rebasing: bytes[..<t.length]))
        var out = [Float](repeating: 0, count: t.elementCount)
        out.withUnsafeMutableBufferPointer { t.decode(UnsafeRawPointer(bytes.baseAddress!), into: $0.baseAddress!) }
        return out
    }

    /// Each Q4_0 tensor's importances from the policy's matrix, by the name llama.cpp gives its
    /// inputs (`ImportanceMatrix.Entry.weights`).
    static func resolveImportance(
        source: any TensorSource, policy: QuantizationPolicy, decisions: [String: QuantizationPolicy.Decision]
    ) throws(FormatError) -> (importance: [String: [Float]], unweighted: [String]) {
        guard let matrix = policy.importance else { return ([:], []) }
        var importance: [String: [Float]] = [:], unweighted: [String] = []
        for t in source.manifest.tensors where decisions[t.name]?.dtype == .q4_0 && t.shape.count == 2 {
            guard let (name, index) = ImportanceMatrix.source(of: t.name), let entry = matrix.entries[name]
            else {
                unweighted.append(t.name)
                continue
            }
            guard index < entry.matrices else {
                throw .invalidRequest(
                    "the importance matrix's \(name) holds \(entry.matrices) matrices and \(t.name) is number \(index + 1): the matrix "
                        + "was made for another model")
            }
            importance[t.name] = try entry.weights(
                matrix: index, rows: t.shape[0], rowLength: t.shape[1], neuronMajor: t.layout.orientation == .transposed,
                name: name, tensor: t.name)
        }
        guard !importance.isEmpty || unweighted.isEmpty else {
            throw .invalidRequest(
                "no tensor of this package is in the importance matrix (its \(matrix.entries.count) entries are named like "
                    + "\(matrix.entries.keys.sorted().first ?? "nothing")): it was made for another model")
        }
        return (importance, unweighted)
    }

    /// Values converted per chunk (both threads together): bounds memory for the embedding.
    static let chunkElements = 1 << 22

    @discardableResult
    public static func write(
        _ plan: QuantizationPlan, to destination: String, overwrite: Bool, threads: Int,
        progress: (WriteProgress) -> Void = { _ in }
    ) throws(FormatError) -> QuantizationReport {
        let start = ProgressReporter.monotonicSeconds()
        let writer = try PackageWriter(destination: destination, manifest: plan.manifest, dataOffset: plan.dataOffset, overwrite: overwrite)
        let source = plan.source
        var reports: [QuantizationReport.Tensor] = []
        let workers = max(1, threads)

        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkElements * 4, alignment: 64)
        defer { input.deallocate() }
        let floats = UnsafeMutablePointer<Float>.allocate(capacity: chunkElements)
        defer { floats.deallocate() }
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkElements * 4, alignment: 64)
        defer { output.deallocate() }
        let roundTrip = UnsafeMutablePointer<Float>.allocate(capacity: chunkElements)
        defer { roundTrip.deallocate() }
        // Rows rearranged to or from a grouped layout pass through here.
        let rearranged = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkElements * 4, alignment: 64)
        defer { rearranged.deallocate() }

        for entry in plan.manifest.tensors {
            let from = source.tensor(entry.name)!
            var error = QuantizationError()
            try writer.writeTensor(entry.name) { (sink) throws(FormatError) in
                if from.dtype == entry.dtype && from.layout != entry.layout {
                    // Same Q4_0 blocks, rearranged: to plain rows and into the new layout,
                    // whole groups of rows per chunk.
                    let rowBytes = from.length / from.rows
                    let unit = max(from.layout.rowUnit, entry.layout.rowUnit)
                    let rowsPerChunk = max(unit, input.count / rowBytes / unit * unit)
                    var row = 0
                    while row < from.rows {
                        let rows = min(rowsPerChunk, from.rows - row)
                        let chunk = UnsafeMutableRawBufferPointer(rebasing: input[..<(rows * rowBytes)])
                        try source.read(from, from: row * rowBytes, into: chunk)
                        from.layout.plainRows(chunk.baseAddress!, into: rearranged.baseAddress!, rowBytes: rowBytes, rowCount: rows)
                        entry.layout.arrange(plain: rearranged.baseAddress!, into: chunk.baseAddress!, rowBytes: rowBytes, rowCount: rows)
                        try sink.append(UnsafeRawBufferPointer(chunk))
                        row += rows
                    }
                    return
                }
                if from.dtype == entry.dtype {
                    // Unchanged: copy the bytes as they are.
                    var done = 0
                    while done < from.length {
                        let n = min(input.count, from.length - done)
                        let chunk = UnsafeMutableRawBufferPointer(rebasing: input[..<n])
                        try source.read(from, from: done, into: chunk)
                        try sink.append(UnsafeRawBufferPointer(chunk))
                        done += n
                    }
                    return
                }
                // Whole rows per chunk; rows split among the workers.
                let rowLength = from.rowLength
                // Whole groups of eight rows when either side is row_major_x8.
                let unit = max(from.layout.rowUnit, entry.layout.rowUnit)
                let rowsPerChunk = max(unit, chunkElements / rowLength / unit * unit)
                let inRowBytes = from.dtype.byteLength(shape: [rowLength])!
                let outRowBytes = entry.dtype.byteLength(shape: [rowLength])!
                var row = 0
                while row < from.rows {
                    let rows = min(rowsPerChunk, from.rows - row)
                    let inBytes = UnsafeMutableRawBufferPointer(rebasing: input[..<(rows * inRowBytes)])
                    try source.read(from, from: row * inRowBytes, into: inBytes)
                    // Grouped source rows are decoded from their plain form.
                    var plainInput = UnsafeRawPointer(inBytes.baseAddress!)
                    if from.layout.isGrouped {
                        from.layout.plainRows(plainInput, into: rearranged.baseAddress!, rowBytes: inRowBytes, rowCount: rows)
                        plainInput = UnsafeRawPointer(rearranged.baseAddress!)
                    }
                    let slices = min(workers, rows)
                    let partial = UnsafeMutableBufferPointer<QuantizationError>.allocate(capacity: slices)
                    defer { partial.deallocate() }
                    let overflow = UnsafeMutableBufferPointer<Int>.allocate(capacity: slices)
                    defer { overflow.deallocate() }
                    let buffers = Unchecked(
                        (
                            input: plainInput, output: output.baseAddress!, floats: floats,
                            back: roundTrip, partial: partial, overflow: overflow
                        ))
                    let fromType = from.dtype, toType = entry.dtype
                    let weights = plan.importance[entry.name], factor = plan.compensation[entry.name]
                    parallelFor(slices) { slice in
                        let b = buffers.value
                        let first = rows * slice / slices, last = rows * (slice + 1) / slices
                        let count = (last - first) * rowLength
                        let values = b.floats + first * rowLength
                        TensorCodec.decode(b.input + first * inRowBytes, dtype: fromType, count: count, into: values)
                        let encoded = b.output + first * outRowBytes
                        if let factor {
                            factor.withUnsafeBufferPointer {
                                Q4_0.quantize(
                                    values, rows: last - first, rowLength: rowLength, compensation: $0.baseAddress!, into: encoded)
                            }
                            b.overflow[slice] = -1
                        } else if let weights {
                            weights.withUnsafeBufferPointer {
                                Q4_0.quantize(values, rows: last - first, rowLength: rowLength, importance: $0.baseAddress!, into: encoded)
                            }
                            b.overflow[slice] = -1
                        } else if toType == .q4_0 {
                            // Blocks and their round-trip error in one pass.
                            var e = QuantizationError()
                            Q4_0.quantize(values, count: count, into: encoded, error: &e)
                            b.overflow[slice] = -1
                            b.partial[slice] = e
                            return
                        } else {
                            b.overflow[slice] =
                                TensorCodec.encode(values, count: count, as: toType, into: encoded).map { first * rowLength + $0 } ?? -1
                        }
                        let back = b.back + first * rowLength
                        TensorCodec.decode(encoded, dtype: toType, count: count, into: back)
                        var e = QuantizationError()
                        e.add(values: values, decoded: back, count: count)
                        b.partial[slice] = e
                    }
                    for slice in 0..<slices {
                        if overflow[slice] >= 0 {
                            throw .unrepresentable(
                                tensor: entry.name,
                                detail:
                                    "value \(floats[overflow[slice]]) overflows \(entry.dtype.rawValue); choose f32 for it with "
                                    + "--tensor-type"
                            )
                        }
                        error.merge(partial[slice])
                    }
                    guard error.sumSquaredValue.isFinite else {
                        throw .unrepresentable(tensor: entry.name, detail: "contains NaN or infinite values; the source package is damaged")
                    }
                    guard error.sumSquaredError.isFinite else {
                        throw .unrepresentable(
                            tensor: entry.name,
                            detail:
                                "values too large for a \(entry.dtype.rawValue) block scale (float16); choose f32 for it with --tensor-type"
                        )
                    }
                    if entry.layout.isGrouped {
                        entry.layout.arrange(
                            plain: output.baseAddress!, into: rearranged.baseAddress!, rowBytes: outRowBytes, rowCount: rows)
                        try sink.append(UnsafeRawBufferPointer(rebasing: rearranged[..<(rows * outRowBytes)]))
                    } else {
                        try sink.append(UnsafeRawBufferPointer(rebasing: output[..<(rows * outRowBytes)]))
                    }
                    row += rows
                }
            }
            source.doneReading(from)
            reports.append(
                .init(
                    name: entry.name, role: TensorNames.role(of: entry.name), from: from.dtype, to: entry.dtype,
                    elements: entry.elementCount, bytesBefore: from.length, bytesAfter: entry.length, error: error))
            progress(writer.progress)
        }
        for file in plan.manifest.files {
            guard let contents = try source.fileContents(file.name) else { preconditionFailure("\(file.name) was planned from the source") }
            try writer.writeFile(file.name, contents: contents)
        }
        try writer.finish()
        progress(writer.progress)
        return QuantizationReport(
            sizeBefore: source.sourceBytes, sizeAfter: plan.outputSize, tensors: reports,
            seconds: ProgressReporter.monotonicSeconds() - start)
    }
}
