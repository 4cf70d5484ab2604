/// An importance matrix in llama.cpp's format (`llama-imatrix -o FILE.gguf`, read by
/// `llama-quantize --imatrix`): a GGUF with `general.type` "imatrix", the calibration files in
/// `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`, and per weight matrix
/// (named as in a GGUF of the model: `blk.3.attn_q.weight`, `blk.3.ffn_down_exps.weight`) two
/// f32 tensors: `NAME.in_sum2`, dimensions [columns, matrices], the sums over the calibration
/// tokens of the square of each input column (per expert for stacked expert tensors, over the
/// tokens routed to it), and `NAME.counts`, [1, matrices], those token counts. The importance of
/// a column is its mean square (sum / count), 1 where an expert saw no token, as llama-quantize
/// takes it.
public struct ImportanceMatrix: Sendable, Equatable {
    public struct Entry: Sendable, Equatable {
        /// Matrix-major: `matrices` rows of `columns` sums.
        public var sums: [Float]
        public var counts: [Float]
        public let columns: Int
        public var matrices: Int { counts.count }

        public init(columns: Int, matrices: Int) {
            self.columns = columns
            sums = [Float](repeating: 0, count: columns * matrices)
            counts = [Float](repeating: 0, count: matrices)
        }

        init(columns: Int, sums: [Float], counts: [Float]) {
            self.columns = columns
            self.sums = sums
            self.counts = counts
        }

        /// Each column's importance for `matrix`: its mean square, 1 where it saw no token.
        public func importance(matrix: Int) -> [Float] {
            let count = counts[matrix]
            return (0..<columns).map { count > 0 ? sums[matrix * columns + $0] / count : 1 }
        }

        /// The importances for the rows of `tensor`, `rows` × `rowLength` values stored from
        /// `matrix` (< `matrices`) of entry `name`. A matrix whose rows run along the inputs takes
        /// its columns' importances; an expert down matrix stored neuron-major (each row one
        /// input, its blocks across the outputs) has one importance per row, which cannot move a
        /// block's choice, so its rows take uniform importances: the weighted search with
        /// llama.cpp's √(σ² + x²) weights alone. Shapes that fit neither are another model's.
        public func weights(
            matrix: Int, rows: Int, rowLength: Int, neuronMajor: Bool, name: String, tensor: String
        ) throws(FormatError) -> [Float] {
            if !neuronMajor && columns == rowLength { return importance(matrix: matrix) }
            if neuronMajor && columns == rows { return [Float](repeating: 1, count: rowLength) }
            throw .invalidRequest(
                "the importance matrix's \(name) has \(columns) columns, and \(tensor) (\(rows) × \(rowLength)) does not multiply "
                    + "that many: the matrix was made for another model")
        }
    }

    public var entries: [String: Entry]
    public var datasets: [String]
    public var chunkCount: Int
    public var chunkSize: Int

    public init(entries: [String: Entry] = [:], datasets: [String] = [], chunkCount: Int = 0, chunkSize: Int = 0) {
        self.entries = entries
        self.datasets = datasets
        self.chunkCount = chunkCount
        self.chunkSize = chunkSize
    }

    /// Adds `other`'s sums, counts, datasets and chunks to these (as `llama-imatrix --in-file`
    /// combines files). A matrix both hold must have the same shape in both; `source` names
    /// `other` in the error.
    public mutating func add(_ other: ImportanceMatrix, source: String) throws(FormatError) {
        for (name, entry) in other.entries {
            guard var mine = entries[name] else {
                entries[name] = entry
                continue
            }
            guard mine.columns == entry.columns, mine.matrices == entry.matrices else {
                throw .invalidRequest(
                    "\(source)'s \(name) is \(entry.columns) × \(entry.matrices) and this model's \(mine.columns) × \(mine.matrices): "
                        + "the importance matrix was made for another model")
            }
            for i in mine.sums.indices { mine.sums[i] += entry.sums[i] }
            for i in mine.counts.indices { mine.counts[i] += entry.counts[i] }
            entries[name] = mine
        }
        datasets += other.datasets
        chunkCount += other.chunkCount
        if chunkSize == 0 { chunkSize = other.chunkSize }
    }

    static let sumsSuffix = ".in_sum2", countsSuffix = ".counts"

    /// Reads and checks a file: every sums tensor has its counts, both f32 and of matching
    /// shapes, every value finite and not negative.
    public init(path: String) throws(FormatError) {
        let file = try GGUFFile(path: path)
        func bad(_ detail: String) -> FormatError { .malformedGGUF(path: path, defect: .invalidValue, detail: detail) }
        if let type = file.metadata["general.type"]?.string, type != "imatrix" {
            throw bad("general.type is '\(type)': this is not an importance matrix (llama-imatrix writes 'imatrix')")
        }
        datasets = file.metadata["imatrix.datasets"]?.array?.compactMap(\.string) ?? []
        chunkCount = file.metadata["imatrix.chunk_count"]?.int ?? 0
        chunkSize = file.metadata["imatrix.chunk_size"]?.int ?? 0
        var entries: [String: Entry] = [:]
        for sums in file.tensors where sums.name.hasSuffix(Self.sumsSuffix) {
            let name = String(sums.name.dropLast(Self.sumsSuffix.count))
            guard let counts = file.tensor(name + Self.countsSuffix) else { throw bad("\(sums.name) has no \(name)\(Self.countsSuffix)") }
            guard sums.type == .f32, counts.type == .f32 else { throw bad("\(name): sums and counts must be f32") }
            guard sums.dimensions.count <= 2, let columns = sums.dimensions.first, columns > 0 else {
                throw bad("\(sums.name) has dimensions \(sums.dimensions); expected [columns, matrices]")
            }
            let matrices = sums.dimensions.count == 2 ? sums.dimensions[1] : 1
            guard counts.elementCount == matrices else {
                throw bad("\(counts.name) holds \(counts.elementCount) counts for \(matrices) matrices")
            }
            func floats(_ t: GGUFTensor) -> [Float] {
                let bytes = file.bytes(of: t)
                return (0..<t.elementCount).map {
                    Float(bitPattern: UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self)))
                }
            }
            let entry = Entry(columns: columns, sums: floats(sums), counts: floats(counts))
            guard entry.sums.allSatisfy({ $0.isFinite && $0 >= 0 }), entry.counts.allSatisfy({ $0.isFinite && $0 >= 0 }) else {
                throw bad("\(name): sums and counts must be finite and not negative")
            }
            entries[name] = entry
        }
        if let orphan = file.tensors.first(where: {
            $0.name.hasSuffix(Self.countsSuffix) && entries[String($0.name.dropLast(Self.countsSuffix.count))] == nil
        }) {
            throw bad("\(orphan.name) has no sums")
        }
        guard !entries.isEmpty else { throw bad("no \(Self.sumsSuffix) tensors: not an importance matrix") }
        self.entries = entries
    }

    /// Writes the file as llama-imatrix does (entries in name order), to a temporary file renamed
    /// into place.
    public func write(to destination: String, overwrite: Bool) throws(FormatError) {
        let metadata: [(String, GGUFValue)] = [
            ("general.type", .string("imatrix")),
            ("imatrix.datasets", .array(8, datasets.map { .string($0) })),
            ("imatrix.chunk_count", .uint32(UInt32(clamping: chunkCount))),
            ("imatrix.chunk_size", .uint32(UInt32(clamping: chunkSize)))
        ]
        var tensors: [GGUFWriter.Tensor] = []
        for (name, entry) in entries.sorted(by: { $0.key < $1.key }) {
            for (suffix, values, dimensions) in [
                (Self.sumsSuffix, entry.sums, [entry.columns, entry.matrices]), (Self.countsSuffix, entry.counts, [1, entry.matrices])
            ] {
                tensors.append(
                    GGUFWriter.Tensor(name: name + suffix, dimensions: dimensions, type: .f32) { (sink) throws(FormatError) in
                        let result: Result<Void, FormatError> = values.withUnsafeBytes { raw in
                            Result { () throws(FormatError) in try sink.append(raw) }
                        }
                        try result.get()
                    })
            }
        }
        try GGUFWriter.write(metadata: metadata, tensors: tensors, alignment: 32, to: destination, overwrite: overwrite)
    }

    /// The GGUF name under which an importance matrix holds a package tensor's inputs, and the
    /// matrix within it (the expert, for stacked expert tensors): `blk.N.attn_q.weight`,
    /// `blk.N.ffn_gate_exps.weight` expert E. nil for tensors that multiply no input (norms,
    /// the embedding lookup).
    public static func source(of tensor: String) -> (name: String, matrix: Int)? {
        let parts = tensor.split(separator: ".")
        if parts.count == 5, parts[0] == "layers", parts[2] == "experts", let layer = Int(parts[1]), let expert = Int(parts[3]) {
            return (GGUFModel.stackedName(String(parts[4]), layer: layer), expert)
        }
        if tensor == TensorNames.output || tensor == TensorNames.embedding { return (GGUFModel.denseName(tensor, layer: nil), 0) }
        guard parts.count >= 2, parts[0] == "layers", let layer = Int(parts[1]) else { return nil }
        let inputs = [TensorNames.query(layer), TensorNames.key(layer), TensorNames.value(layer), TensorNames.attentionOutput(layer)]
        return inputs.contains(tensor) ? (GGUFModel.denseName(tensor, layer: layer), 0) : nil
    }
}
