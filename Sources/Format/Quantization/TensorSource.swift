/// What the quantiser reads: a manifest of float (or quantised) tensors in package form, their
/// bytes, and the embedded files. A package is one; so is a planned conversion of a Hugging Face
/// checkpoint, which is how `stconvert --type q4_0` quantises while it converts, with no float
/// package in between.
public protocol TensorSource: Sendable {
    var path: String { get }
    /// Bytes of the source, for the report (`size: before -> after`).
    var sourceBytes: Int { get }
    var manifest: PackageManifest { get }
    func tensor(_ name: String) -> TensorEntry?
    /// `buffer.count` bytes of `tensor` in its package form, from `offset` bytes into it.
    func read(_ tensor: TensorEntry, from offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FormatError)
    /// Called when the quantiser is done with `tensor` (lets a source drop what it cached).
    func doneReading(_ tensor: TensorEntry)
    func fileContents(_ name: String) throws(FormatError) -> [UInt8]?
}

extension PackageReader: TensorSource {
    public var sourceBytes: Int { header.fileLength }
    public func doneReading(_ tensor: TensorEntry) {}
}

/// A planned checkpoint conversion read as the package it would write: tensors in the source
/// dtype, expert down matrices transposed (each a few MB, transposed whole on first read and
/// kept until the quantiser moves on).
public final class ConversionSource: TensorSource, @unchecked Sendable {
    public let plan: ConversionPlan
    public var path: String { plan.checkpoint.directory }
    public var sourceBytes: Int { plan.checkpoint.sourceFiles.reduce(0) { $0 + $1.size } }
    public var manifest: PackageManifest { plan.manifest }
    private let entries: [String: TensorEntry]
    private var transposed: (name: String, bytes: [UInt8])?

    public init(_ plan: ConversionPlan) throws(FormatError) {
        guard plan.manifest.tensors.allSatisfy({ plan.sources[$0.name]!.dtype == $0.dtype }) else {
            throw .invalidRequest("a conversion that also quantises keeps the source dtypes on the way (no --dtype)")
        }
        self.plan = plan
        entries = Dictionary(uniqueKeysWithValues: plan.manifest.tensors.map { ($0.name, $0) })
    }

    public func tensor(_ name: String) -> TensorEntry? { entries[name] }

    public func read(_ tensor: TensorEntry, from offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FormatError) {
        let source = plan.sources[tensor.name]!
        let shard = plan.checkpoint.shard(for: source)
        guard tensor.layout == .transposed else { return try shard.read(source, from: offset, into: buffer) }
        if transposed?.name != tensor.name {
            let rows = source.shape[0], cols = source.shape[1], size = source.dtype.blockBytes
            var raw = [UInt8](repeating: 0, count: source.length), out = raw
            let result: Result<Void, FormatError> = raw.withUnsafeMutableBytes { r in
                Result { () throws(FormatError) in try shard.read(source, into: r) }
            }
            try result.get()
            raw.withUnsafeBytes { r in
                out.withUnsafeMutableBytes {
                    Transpose.elements(r.baseAddress!, rows: rows, columns: cols, elementSize: size, into: $0.baseAddress!)
                }
            }
            transposed = (tensor.name, out)
        }
        transposed!.bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count])) }
    }

    public func doneReading(_ tensor: TensorEntry) {
        let source = plan.sources[tensor.name]!
        plan.checkpoint.shard(for: source).doneReading(source)
        if transposed?.name == tensor.name { transposed = nil }
    }

    public func fileContents(_ name: String) throws(FormatError) -> [UInt8]? {
        guard let file = plan.checkpoint.auxiliaryFiles.first(where: { $0.name == name }) else { return nil }
        return try FileSystem.readAll(file.path, limit: Checkpoint.maximumSideFileLength)
    }
}
