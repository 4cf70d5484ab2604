/// Progress of a long write, reported to the caller (the library never prints).
public struct WriteProgress: Sendable {
    public var bytesWritten: Int
    public var totalBytes: Int
    public var tensorsWritten: Int
    /// The layer whose experts are being written; nil while writing dense tensors or files.
    public var layer: Int?

    /// What is being written, for a progress line: "experts of layer 3/52" or "dense tensors".
    public func label(layers: Int) -> String { layer.map { "experts of layer \($0 + 1)/\(layers)" } ?? "dense tensors" }
}

/// A conversion, planned: what `stconvert --dry-run` shows and `Converter.write` executes.
public struct ConversionPlan: Sendable {
    public let checkpoint: Checkpoint
    public let manifest: PackageManifest
    public let dataOffset: Int
    public var outputSize: Int { PackageLayout.fileLength(of: manifest, dataOffset: dataOffset) }
    /// Package tensor name → checkpoint tensor.
    public let sources: [String: SafetensorsTensor]
}

/// Hugging Face checkpoint → .stpk package.
public enum Converter {
    /// Elements converted per chunk: bounds memory for huge tensors (embeddings).
    static let chunkElements = 1 << 20

    /// - Parameter dtype: the stored dtype of every tensor, or nil to keep each source dtype.
    public static func plan(checkpoint: Checkpoint, dtype: TensorDType?) throws(FormatError) -> ConversionPlan {
        if let dtype, dtype.isQuantized {
            throw .invalidRequest("stconvert writes f32, f16 or bf16; quantise the package with stquant")
        }
        let c = checkpoint.config
        var planned: [PlannedTensor] = []
        var sources: [String: SafetensorsTensor] = [:]
        func add(_ e: ExpectedTensor) {
            let source = checkpoint.tensors[e.sourceName]!
            sources[e.name] = source
            planned.append(
                PlannedTensor(
                    name: e.name, sourceName: e.sourceName, dtype: dtype ?? source.dtype,
                    shape: e.storedShape, layout: e.layout, bundle: e.expert))
        }
        for e in TensorNames.all(c) { add(e) }

        var files: [(name: String, length: Int)] = []
        for file in checkpoint.auxiliaryFiles {
            let size = try FileSystem.fileSize(file.path)
            guard size <= Checkpoint.maximumSideFileLength else {
                throw .invalidRequest("\(file.path) is \(size) bytes; embedded files are at most \(Checkpoint.maximumSideFileLength)")
            }
            files.append((file.name, size))
        }
        var provenance = JSONObject()
        provenance["converter"] = .string("stconvert \(PackageFormat.converterVersion)")
        provenance["source_files"] = .array(
            checkpoint.sourceFiles.map {
                .object(JSONObject([("name", .string($0.name)), ("size", .int($0.size))]))
            })
        provenance["source_dtypes"] = .array(Set(checkpoint.tensors.values.map { $0.dtype.rawValue }).sorted().map { .string($0) })
        let (manifest, dataOffset) = try PackageLayout.plan(config: c, tensors: planned, files: files, provenance: provenance)
        return ConversionPlan(checkpoint: checkpoint, manifest: manifest, dataOffset: dataOffset, sources: sources)
    }

    /// Writes the planned package to `destination` (atomically: temporary file, then rename).
    public static func write(
        _ plan: ConversionPlan, to destination: String, overwrite: Bool,
        progress: (WriteProgress) -> Void = { _ in }
    ) throws(FormatError) {
        let writer = try PackageWriter(destination: destination, manifest: plan.manifest, dataOffset: plan.dataOffset, overwrite: overwrite)
        let transposed = plan.manifest.tensors.filter { $0.layout == .transposed }.map(\.elementCount).max() ?? 0
        let buffers = Buffers(elements: max(chunkElements, transposed))
        for entry in plan.manifest.tensors {
            let source = plan.sources[entry.name]!
            let shard = plan.checkpoint.shard(for: source)
            try writer.writeTensor(entry.name) { (sink) throws(FormatError) in
                if entry.layout == .transposed {
                    try writeTransposed(source, shard: shard, as: entry, buffers: buffers, into: &sink)
                } else {
                    try writeConverted(source, shard: shard, as: entry, buffers: buffers, into: &sink)
                }
            }
            shard.doneReading(source)
            progress(writer.progress)
        }
        for file in plan.checkpoint.auxiliaryFiles {
            try writer.writeFile(file.name, contents: try FileSystem.readAll(file.path, limit: Checkpoint.maximumSideFileLength))
        }
        try writer.finish()
        progress(writer.progress)
    }

    /// The working memory of a conversion, allocated once for all its tensors (room for a chunk
    /// and for the largest transposed tensor in any float dtype), so that memory stays at that
    /// whatever the allocator does with thousands of buffers allocated and freed in turn.
    private final class Buffers {
        let elements: Int
        let input: UnsafeMutableRawBufferPointer  // (elements) source values
        let transposed: UnsafeMutableRawBufferPointer  // (elements) source values, transposed
        let floats: UnsafeMutablePointer<Float>  // (elements)
        let output: UnsafeMutableRawBufferPointer  // (elements) stored values

        init(elements: Int) {
            self.elements = elements
            input = .allocate(byteCount: 4 * max(1, elements), alignment: 64)
            transposed = .allocate(byteCount: 4 * max(1, elements), alignment: 64)
            floats = .allocate(capacity: max(1, elements))
            output = .allocate(byteCount: 4 * max(1, elements), alignment: 64)
        }

        deinit {
            input.deallocate(); transposed.deallocate(); floats.deallocate(); output.deallocate()
        }
    }

    /// Row-major copy with dtype conversion, in chunks.
    private static func writeConverted(
        _ source: SafetensorsTensor, shard: SafetensorsFile, as entry: TensorEntry, buffers: Buffers,
        into sink: inout ByteSink
    ) throws(FormatError) {
        let count = entry.elementCount
        let sourceSize = source.dtype.blockBytes
        let chunk = min(count, chunkElements)
        let needsConversion = source.dtype != entry.dtype
        var done = 0
        while done < count {
            let n = min(chunk, count - done)
            let inBytes = UnsafeMutableRawBufferPointer(rebasing: buffers.input[..<(n * sourceSize)])
            try shard.read(source, from: done * sourceSize, into: inBytes)
            if needsConversion {
                FloatCodecs.decode(inBytes.baseAddress!, dtype: source.dtype, count: n, into: buffers.floats)
                if let overflow = FloatCodecs.encode(buffers.floats, count: n, as: entry.dtype, into: buffers.output.baseAddress!) {
                    throw .unrepresentable(
                        tensor: entry.sourceName,
                        detail:
                            "value \(buffers.floats[overflow]) at element \(done + overflow) overflows \(entry.dtype.rawValue); keep the "
                            + "source dtype or use f32"
                    )
                }
                try sink.append(UnsafeRawBufferPointer(rebasing: buffers.output[..<(n * entry.dtype.blockBytes)]))
            } else {
                try sink.append(UnsafeRawBufferPointer(inBytes))
            }
            done += n
        }
    }

    /// A [rows, cols] source stored as its [cols, rows] transpose (expert down matrices, a few MB).
    private static func writeTransposed(
        _ source: SafetensorsTensor, shard: SafetensorsFile, as entry: TensorEntry, buffers: Buffers,
        into sink: inout ByteSink
    ) throws(FormatError) {
        let rows = source.shape[0], cols = source.shape[1]
        let count = rows * cols
        precondition(count <= buffers.elements, "conversion buffers planned too small for \(entry.name)")
        let raw = UnsafeMutableRawBufferPointer(rebasing: buffers.input[..<source.length])
        try shard.read(source, into: raw)
        let transposed = UnsafeMutableRawBufferPointer(rebasing: buffers.transposed[..<source.length])
        // Elements moved as raw bytes, so a same-dtype transpose is exact bit for bit.
        Transpose.elements(raw.baseAddress!, rows: rows, columns: cols, elementSize: source.dtype.blockBytes, into: transposed.baseAddress!)
        if source.dtype == entry.dtype {
            try sink.append(UnsafeRawBufferPointer(transposed))
            return
        }
        FloatCodecs.decode(transposed.baseAddress!, dtype: source.dtype, count: count, into: buffers.floats)
        if let overflow = FloatCodecs.encode(buffers.floats, count: count, as: entry.dtype, into: buffers.output.baseAddress!) {
            throw .unrepresentable(
                tensor: entry.sourceName,
                detail: "value \(buffers.floats[overflow]) overflows \(entry.dtype.rawValue); keep the source dtype or use f32")
        }
        try sink.append(UnsafeRawBufferPointer(rebasing: buffers.output[..<(count * entry.dtype.blockBytes)]))
    }
}
