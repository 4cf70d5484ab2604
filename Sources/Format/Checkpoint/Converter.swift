/// Progress of a long write, reported to the caller (the library never prints).
public struct WriteProgress: Sendable {
    public var bytesWritten: Int
    public var totalBytes: Int
    public var tensorsWritten: Int
    public var totalTensors: Int
    /// The layer whose experts are being written; nil while writing dense tensors or files.
    public var layer: Int?
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
            planned.append(PlannedTensor(name: e.name, sourceName: e.sourceName, dtype: dtype ?? source.dtype,
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
        provenance["source_files"] = .array(checkpoint.sourceFiles.map {
            .object(JSONObject([("name", .string($0.name)), ("size", .int($0.size))]))
        })
        provenance["source_dtypes"] = .array(Set(checkpoint.tensors.values.map { $0.dtype.rawValue }).sorted().map { .string($0) })
        let (manifest, dataOffset) = try PackageLayout.plan(config: c, tensors: planned, files: files, provenance: provenance)
        return ConversionPlan(checkpoint: checkpoint, manifest: manifest, dataOffset: dataOffset, sources: sources)
    }

    /// Writes the planned package to `destination` (atomically: temporary file, then rename).
    public static func write(_ plan: ConversionPlan, to destination: String, overwrite: Bool,
                             progress: (WriteProgress) -> Void = { _ in }) throws(FormatError) {
        let writer = try PackageWriter(destination: destination, manifest: plan.manifest, dataOffset: plan.dataOffset, overwrite: overwrite)
        for entry in plan.manifest.tensors {
            let source = plan.sources[entry.name]!
            let shard = plan.checkpoint.shard(for: source)
            try writer.writeTensor(entry.name) { (sink) throws(FormatError) in
                if entry.layout == .transposed {
                    try writeTransposed(source, shard: shard, as: entry, into: &sink)
                } else {
                    try writeConverted(source, shard: shard, as: entry, into: &sink)
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

    /// Row-major copy with dtype conversion, in chunks.
    private static func writeConverted(_ source: SafetensorsTensor, shard: SafetensorsFile, as entry: TensorEntry,
                                       into sink: inout ByteSink) throws(FormatError) {
        let count = entry.elementCount
        let sourceSize = source.dtype.blockBytes
        let chunk = min(count, chunkElements)
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, chunk * sourceSize), alignment: 64)
        defer { input.deallocate() }
        let needsConversion = source.dtype != entry.dtype
        let floats = UnsafeMutablePointer<Float>.allocate(capacity: needsConversion ? chunk : 1)
        defer { floats.deallocate() }
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: needsConversion ? max(1, chunk * entry.dtype.blockBytes) : 1, alignment: 64)
        defer { output.deallocate() }
        var done = 0
        while done < count {
            let n = min(chunk, count - done)
            let inBytes = UnsafeMutableRawBufferPointer(rebasing: input[..<(n * sourceSize)])
            try shard.read(source, from: done * sourceSize, into: inBytes)
            if needsConversion {
                FloatCodecs.decode(inBytes.baseAddress!, dtype: source.dtype, count: n, into: floats)
                if let overflow = FloatCodecs.encode(floats, count: n, as: entry.dtype, into: output.baseAddress!) {
                    throw .unrepresentable(tensor: entry.sourceName, detail: "value \(floats[overflow]) at element \(done + overflow) overflows \(entry.dtype.rawValue); keep the source dtype or use f32")
                }
                try sink.append(UnsafeRawBufferPointer(rebasing: output[..<(n * entry.dtype.blockBytes)]))
            } else {
                try sink.append(UnsafeRawBufferPointer(inBytes))
            }
            done += n
        }
    }

    /// A [rows, cols] source stored as its [cols, rows] transpose (expert down matrices, a few MB).
    private static func writeTransposed(_ source: SafetensorsTensor, shard: SafetensorsFile, as entry: TensorEntry,
                                        into sink: inout ByteSink) throws(FormatError) {
        let rows = source.shape[0], cols = source.shape[1]
        let count = rows * cols
        let floats = UnsafeMutablePointer<Float>.allocate(capacity: count)
        defer { floats.deallocate() }
        do {
            let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, source.length), alignment: 64)
            defer { raw.deallocate() }
            try shard.read(source, into: raw)
            let transposed = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, source.length), alignment: 64)
            defer { transposed.deallocate() }
            let size = source.dtype.blockBytes
            // Move elements as raw bytes, so a same-dtype transpose is exact bit for bit.
            for r in 0..<rows {
                for c in 0..<cols {
                    (transposed.baseAddress! + (c * rows + r) * size).copyMemory(from: raw.baseAddress! + (r * cols + c) * size, byteCount: size)
                }
            }
            if source.dtype == entry.dtype {
                try sink.append(UnsafeRawBufferPointer(transposed))
                return
            }
            FloatCodecs.decode(transposed.baseAddress!, dtype: source.dtype, count: count, into: floats)
        }
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: count * entry.dtype.blockBytes, alignment: 64)
        defer { output.deallocate() }
        if let overflow = FloatCodecs.encode(floats, count: count, as: entry.dtype, into: output.baseAddress!) {
            throw .unrepresentable(tensor: entry.sourceName, detail: "value \(floats[overflow]) overflows \(entry.dtype.rawValue); keep the source dtype or use f32")
        }
        try sink.append(UnsafeRawBufferPointer(output))
    }
}
