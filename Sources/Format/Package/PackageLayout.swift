/// A tensor to be placed in a package: everything but where it goes.
public struct PlannedTensor: Sendable {
    public var name: String
    public var sourceName: String
    public var dtype: TensorDType
    public var shape: [Int]
    public var layout: TensorLayout
    /// Set for expert tensors; nil for dense ones.
    public var bundle: (layer: Int, expert: Int)?

    public init(
        name: String, sourceName: String, dtype: TensorDType, shape: [Int], layout: TensorLayout, bundle: (layer: Int, expert: Int)?
    ) {
        self.name = name
        self.sourceName = sourceName
        self.dtype = dtype
        self.shape = shape
        self.layout = layout
        self.bundle = bundle
    }
}

/// Decides where everything goes in a package (`specs/FORMAT.md`, "Layout"):
/// header, manifest, zero padding to the data offset, dense tensors (64-byte aligned), the
/// expert region (one 4096-aligned, 4096-padded bundle per expert, layer-major then
/// expert-minor, each holding gate, up, down at 64-byte aligned offsets), then embedded files.
public enum PackageLayout {
    /// Returns a manifest with every offset and length filled in and zero checksums, and the
    /// data offset. The manifest's serialised length does not change when the checksums are
    /// filled in (they are fixed-width hex), so it can be written after the data.
    public static func plan(
        config: ModelConfig, tensors: [PlannedTensor], files: [(name: String, length: Int)],
        provenance: JSONObject
    ) throws(FormatError) -> (manifest: PackageManifest, dataOffset: Int) {
        var dataOffset = PackageFormat.dataAlignment
        while true {
            let manifest = try place(config: config, tensors: tensors, files: files, provenance: provenance, dataOffset: dataOffset)
            let manifestLength = JSONWriter.serialize(manifest.json).utf8.count
            let needed = PackageFormat.align(PackageFormat.headerLength + manifestLength, to: PackageFormat.dataAlignment)
            if needed <= dataOffset { return (manifest, dataOffset) }
            dataOffset = needed
        }
    }

    private static func place(
        config: ModelConfig, tensors: [PlannedTensor], files: [(name: String, length: Int)],
        provenance: JSONObject, dataOffset: Int
    ) throws(FormatError) -> PackageManifest {
        var position = dataOffset
        var entries: [TensorEntry] = []
        func entry(_ t: PlannedTensor) throws(FormatError) -> TensorEntry {
            guard let length = t.dtype.byteLength(shape: t.shape) else {
                throw .invalidRequest(
                    "tensor \(t.name): shape \(t.shape) cannot be stored as \(t.dtype.rawValue) (rows must split into blocks of "
                        + "\(t.dtype.blockSize))"
                )
            }
            position = PackageFormat.align(position, to: PackageFormat.tensorAlignment)
            defer { position += length }
            return TensorEntry(
                name: t.name, sourceName: t.sourceName, dtype: t.dtype, shape: t.shape, layout: t.layout,
                offset: position, length: length)
        }
        for t in tensors where t.bundle == nil { entries.append(try entry(t)) }

        // Group expert tensors by (layer, expert), keeping their given order inside a bundle.
        var groups: [[PlannedTensor]] = []
        var groupIndex: [Int: Int] = [:]
        for t in tensors {
            guard let b = t.bundle else { continue }
            let key = b.layer * config.expertCount + b.expert
            if let i = groupIndex[key] { groups[i].append(t) } else { groupIndex[key] = groups.count; groups.append([t]) }
        }
        groups.sort { ($0[0].bundle!.layer, $0[0].bundle!.expert) < ($1[0].bundle!.layer, $1[0].bundle!.expert) }
        var bundles: [BundleEntry] = []
        for group in groups {
            position = PackageFormat.align(position, to: PackageFormat.bundleAlignment)
            let start = position
            for t in group { entries.append(try entry(t)) }
            position = PackageFormat.align(position, to: PackageFormat.bundleAlignment)
            bundles.append(
                BundleEntry(
                    layer: group[0].bundle!.layer, expert: group[0].bundle!.expert,
                    offset: start, length: position - start, crc32: 0, tensors: group.map(\.name)))
        }
        var fileEntries: [FileEntry] = []
        for file in files {
            position = PackageFormat.align(position, to: PackageFormat.tensorAlignment)
            fileEntries.append(FileEntry(name: file.name, offset: position, length: file.length, crc32: 0))
            position += file.length
        }
        return PackageManifest(config: config, tensors: entries, bundles: bundles, files: fileEntries, provenance: provenance)
    }

    /// The end of the last byte range: the package's file length.
    public static func fileLength(of manifest: PackageManifest, dataOffset: Int) -> Int {
        let ends =
            manifest.tensors.map { $0.offset + $0.length } + manifest.bundles.map { $0.offset + $0.length }
            + manifest.files.map { $0.offset + $0.length }
        return max(dataOffset, ends.max() ?? dataOffset)
    }
}
