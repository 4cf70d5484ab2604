/// Opens a .stpk package: memory-maps it, checks the header and manifest, and checks every range
/// the manifest names before anything uses it (`specs/FORMAT.md`, "Reader obligations").
/// Opening does not read tensor data; `verify()` checks every checksum and every padding byte.
public final class PackageReader: @unchecked Sendable {
    public let path: String
    public let header: PackageHeader
    public let manifest: PackageManifest
    public let mapping: MappedFile
    /// For positioned reads that should not stay resident (streaming tools).
    let file: SystemFile
    /// Name → index into `manifest.tensors`.
    public let tensorIndex: [String: Int]

    public init(path: String) throws(FormatError) {
        self.path = path
        mapping = try MappedFile(path: path)
        file = try SystemFile.openForReading(path)
        let bytes = mapping.bytes
        func defect(_ kind: PackageDefect, _ detail: String) -> FormatError { .malformedPackage(path: path, defect: kind, detail: detail) }

        header = try PackageHeader(decoding: Array(bytes.prefix(PackageFormat.headerLength)), fileSize: bytes.count, path: path)
        let manifestBytes = UnsafeRawBufferPointer(rebasing: bytes[header.manifestOffset..<header.manifestOffset + header.manifestLength])
        let actualCRC = CRC32.checksum(manifestBytes)
        guard actualCRC == header.manifestCRC32 else {
            throw defect(
                .manifestChecksum,
                "manifest at byte \(header.manifestOffset) has CRC-32 \(CRC32.hex(actualCRC)); the header records "
                    + "\(CRC32.hex(header.manifestCRC32))"
            )
        }
        let json: JSONValue
        do {
            json = try JSONParser.parse(manifestBytes)
        } catch {
            throw defect(.invalidManifest, "\(error.reason) at byte \(header.manifestOffset + error.offset)")
        }
        manifest = try PackageManifest(json: json, path: path)
        tensorIndex = try PackageReader.checkStructure(manifest, header: header, path: path)
    }

    /// Every cross-field and range check that needs no tensor data.
    static func checkStructure(_ m: PackageManifest, header: PackageHeader, path: String) throws(FormatError) -> [String: Int] {
        func defect(_ kind: PackageDefect, _ detail: String) -> FormatError { .malformedPackage(path: path, defect: kind, detail: detail) }
        guard m.tensors.count <= PackageFormat.maximumTensorCount, m.files.count <= PackageFormat.maximumFileCount else {
            throw defect(
                .invalidManifest,
                "\(m.tensors.count) tensors and \(m.files.count) files exceed the limits \(PackageFormat.maximumTensorCount) and "
                    + "\(PackageFormat.maximumFileCount)"
            )
        }
        // Ranges: inside the data region, not overlapping, aligned.
        var ranges: [(start: Int, end: Int, what: String)] = []
        func checkRange(_ offset: Int, _ length: Int, _ what: String) throws(FormatError) {
            let (end, overflow) = offset.addingReportingOverflow(length)
            guard !overflow, offset >= header.dataOffset, end <= header.fileLength else {
                throw defect(
                    .rangeOutOfBounds,
                    "\(what) at [\(offset), \(offset &+ length)) lies outside the data region [\(header.dataOffset), \(header.fileLength))")
            }
            ranges.append((offset, end, what))
        }
        var index: [String: Int] = [:]
        for (i, t) in m.tensors.enumerated() {
            guard index.updateValue(i, forKey: t.name) == nil else { throw defect(.invalidManifest, "tensor \(t.name) is listed twice") }
            guard let length = t.dtype.byteLength(shape: t.shape), length == t.length else {
                throw defect(
                    .invalidManifest,
                    "tensor \(t.name): \(t.dtype.rawValue) \(t.shape) needs "
                        + "\(t.dtype.byteLength(shape: t.shape).map(String.init) ?? "an impossible number of") bytes, but its length is "
                        + "\(t.length)"
                )
            }
            guard t.offset % PackageFormat.tensorAlignment == 0 else {
                throw defect(.misaligned, "tensor \(t.name) at byte \(t.offset) is not \(PackageFormat.tensorAlignment)-byte aligned")
            }
            guard t.layout == .rowMajor || t.shape.count == 2 else {
                throw defect(.invalidManifest, "tensor \(t.name) is \(t.layout.rawValue) but not 2-D")
            }
            if t.layout.isGrouped {
                let since = t.layout == .rowMajorX8 ? 2 : 3
                guard header.majorVersion >= since else {
                    throw defect(
                        .invalidManifest,
                        "tensor \(t.name) is \(t.layout.rawValue), which format \(header.majorVersion).\(header.minorVersion) does not have"
                    )
                }
                guard t.layout.fits(dtype: t.dtype, rows: t.shape[0], rowBytes: t.length / max(1, t.shape[0])) else {
                    let needs = t.layout == .rowMajorX8 ? "a multiple of 8 rows" : "rows of a multiple of 256 values"
                    throw defect(
                        .invalidManifest,
                        "tensor \(t.name) is \(t.layout.rawValue), which needs q4_0 and \(needs) (it is \(t.dtype.rawValue) \(t.shape))")
                }
            }
            try checkRange(t.offset, t.length, "tensor \(t.name)")
        }
        var fileNames = Set<String>()
        for f in m.files {
            guard fileNames.insert(f.name).inserted else { throw defect(.invalidManifest, "file \(f.name) is listed twice") }
            try checkRange(f.offset, f.length, "file \(f.name)")
        }
        ranges.sort { $0.start < $1.start }
        for (a, b) in zip(ranges, ranges.dropFirst()) where b.start < a.end {
            throw defect(.overlappingRanges, "\(a.what) [\(a.start), \(a.end)) overlaps \(b.what) from byte \(b.start)")
        }

        // The model: every tensor the config calls for, with the shape it calls for.
        let c = m.config
        var seen = Set<String>()
        func require(_ expected: ExpectedTensor) throws(FormatError) -> TensorEntry {
            guard let i = index[expected.name] else { throw defect(.invalidManifest, "tensor \(expected.name) is missing") }
            let t = m.tensors[i]
            guard t.shape == expected.storedShape, t.layout.orientation == expected.layout else {
                throw defect(
                    .invalidManifest,
                    "tensor \(t.name) is \(t.shape) \(t.layout.rawValue); the config calls for \(expected.storedShape) "
                        + "\(expected.layout.rawValue)"
                )
            }
            seen.insert(t.name)
            return t
        }
        for expected in TensorNames.denseTensors(c) { _ = try require(expected) }

        // Bundles: one per (layer, expert), layer-major, aligned, each holding exactly its expert's
        // three tensors in order, the first at the bundle's start.
        guard m.bundles.count == c.layerCount * c.expertCount else {
            throw defect(.invalidManifest, "\(m.bundles.count) expert bundles; the config calls for \(c.layerCount) × \(c.expertCount)")
        }
        var previousEnd = 0
        for (i, b) in m.bundles.enumerated() {
            let where_ = "expert bundle (layer \(b.layer), expert \(b.expert)) at byte \(b.offset)"
            guard b.layer == i / c.expertCount, b.expert == i % c.expertCount else {
                throw defect(.invalidManifest, "\(where_) is out of order; bundles are layer-major, expert-minor")
            }
            guard b.offset % PackageFormat.bundleAlignment == 0, b.length % PackageFormat.bundleAlignment == 0, b.length > 0 else {
                throw defect(
                    .misaligned, "\(where_) with length \(b.length) is not \(PackageFormat.bundleAlignment)-byte aligned and padded")
            }
            let (end, overflow) = b.offset.addingReportingOverflow(b.length)
            guard !overflow, b.offset >= header.dataOffset, end <= header.fileLength, b.offset >= previousEnd else {
                throw defect(
                    .rangeOutOfBounds, "\(where_) with length \(b.length) is outside the data region or overlaps the previous bundle")
            }
            previousEnd = end
            let expected = TensorNames.expertTensors(c, layer: b.layer, expert: b.expert)
            guard b.tensors == expected.map(\.name) else {
                throw defect(.invalidManifest, "\(where_) holds \(b.tensors); expected \(expected.map(\.name))")
            }
            var cursor = b.offset
            for e in expected {
                let t = try require(e)
                guard t.offset >= cursor, t.offset + t.length <= end, t.offset - cursor < PackageFormat.tensorAlignment else {
                    throw defect(
                        .rangeOutOfBounds, "tensor \(t.name) at [\(t.offset), \(t.offset + t.length)) is not packed inside \(where_)")
                }
                cursor = t.offset + t.length
            }
            guard end - cursor < PackageFormat.bundleAlignment else {
                throw defect(
                    .invalidManifest,
                    "\(where_) has \(end - cursor) bytes of padding; at most \(PackageFormat.bundleAlignment - 1) are allowed")
            }
        }
        if let extra = m.tensors.first(where: { !seen.contains($0.name) }) {
            throw defect(.invalidManifest, "tensor \(extra.name) is not part of the model the config describes")
        }
        return index
    }

    // MARK: Access

    /// A tensor's values as float32 in the source's element order for its orientation, whatever
    /// its dtype and however its rows are grouped.
    public func decode(_ tensor: TensorEntry, into out: UnsafeMutablePointer<Float>) {
        tensor.decode(bytes(of: tensor).baseAddress!, into: out)
    }

    public func bytes(of tensor: TensorEntry) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: mapping.bytes[tensor.offset..<tensor.offset + tensor.length])
    }

    /// Reads `buffer.count` bytes of `tensor`, starting `offset` bytes into it, with a positioned
    /// read (no memory map), and lets the page cache drop them.
    public func read(_ tensor: TensorEntry, from offset: Int, into buffer: UnsafeMutableRawBufferPointer) throws(FormatError) {
        precondition(offset >= 0 && offset + buffer.count <= tensor.length)
        try file.read(into: buffer, at: tensor.offset + offset)
        file.dropCache(offset: tensor.offset + offset, length: buffer.count)
    }

    public func tensor(_ name: String) -> TensorEntry? {
        tensorIndex[name].map { manifest.tensors[$0] }
    }

    public func fileContents(_ name: String) -> [UInt8]? {
        guard let f = manifest.file(named: name) else { return nil }
        return Array(mapping.bytes[f.offset..<f.offset + f.length])
    }

    // MARK: Verification

    /// Checks every checksum (tensor, bundle, file) and that every byte after the manifest not
    /// covered by a tensor or file is zero. Reads the file once, front to back, in bounded chunks
    /// (not through the memory map, so a 40 GB package does not become 40 GB of resident pages),
    /// and throws at the first problem in file order, naming it and its byte offset.
    /// `progress` is called with bytes checked so far and the total.
    public func verify(progress: (Int, Int) -> Void = { _, _ in }) throws(FormatError) {
        func defect(_ kind: PackageDefect, _ detail: String) -> FormatError { .malformedPackage(path: path, defect: kind, detail: detail) }
        enum Owner { case tensor(TensorEntry), file(FileEntry) }
        let spans: [(start: Int, end: Int, owner: Owner)] =
            (manifest.tensors.map { ($0.offset, $0.offset + $0.length, Owner.tensor($0)) }
            + manifest.files.map { ($0.offset, $0.offset + $0.length, Owner.file($0)) }).sorted { $0.0 < $1.0 }
        let bundleOf = manifest.bundleOfTensor

        func finishSpan(_ span: (start: Int, end: Int, owner: Owner), _ crc: UInt32) throws(FormatError) {
            switch span.owner {
            case .tensor(let t) where crc != t.crc32:
                let inBundle =
                    bundleOf[t.name].map { " (in the expert bundle of layer \($0.layer), expert \($0.expert) at byte \($0.offset))" } ?? ""
                throw defect(
                    .tensorChecksum,
                    "tensor \(t.name) at byte \(t.offset)\(inBundle): CRC-32 is \(CRC32.hex(crc)), expected \(CRC32.hex(t.crc32))")
            case .file(let f) where crc != f.crc32:
                throw defect(
                    .tensorChecksum,
                    "embedded file \(f.name) at byte \(f.offset): CRC-32 is \(CRC32.hex(crc)), expected \(CRC32.hex(f.crc32))")
            default: break
            }
        }

        let total = header.fileLength
        let chunkSize = 8 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkSize, alignment: 4096)
        defer { buffer.deallocate() }
        var spanIndex = 0, spanCRC = CRC32()
        var bundleIndex = 0, bundleCRC = CRC32()
        var position = header.manifestOffset + header.manifestLength
        while position < total {
            let count = min(chunkSize, total - position)
            let chunk = UnsafeMutableRawBufferPointer(rebasing: buffer[..<count])
            try file.read(into: chunk, at: position)
            let chunkEnd = position + count
            func slice(_ from: Int, _ to: Int) -> UnsafeRawBufferPointer {
                UnsafeRawBufferPointer(rebasing: chunk[(from - position)..<(to - position)])
            }
            // Tensors, files and the zero gaps between them.
            var p = position
            while p < chunkEnd {
                if spanIndex < spans.count, p >= spans[spanIndex].start {
                    let end = min(spans[spanIndex].end, chunkEnd)
                    spanCRC.update(slice(p, end))
                    p = end
                    if p == spans[spanIndex].end {
                        try finishSpan(spans[spanIndex], spanCRC.value)
                        spanCRC = CRC32()
                        spanIndex += 1
                    }
                } else {
                    let end = min(spanIndex < spans.count ? spans[spanIndex].start : chunkEnd, chunkEnd)
                    let gap = slice(p, end)
                    if let i = gap.firstIndex(where: { $0 != 0 }) {
                        throw defect(.nonZeroPadding, "byte \(p + i) lies in padding but is 0x\(String(gap[i], radix: 16))")
                    }
                    p = end
                }
            }
            // Bundles: each CRC covers the bundle's tensors and its padding.
            var b = position
            while b < chunkEnd, bundleIndex < manifest.bundles.count {
                let bundle = manifest.bundles[bundleIndex]
                if b < bundle.offset { b = min(bundle.offset, chunkEnd); continue }
                let end = min(bundle.offset + bundle.length, chunkEnd)
                bundleCRC.update(slice(b, end))
                b = end
                if b == bundle.offset + bundle.length {
                    guard bundleCRC.value == bundle.crc32 else {
                        throw defect(
                            .bundleChecksum,
                            "expert bundle of layer \(bundle.layer), expert \(bundle.expert) at byte \(bundle.offset): CRC-32 is "
                                + "\(CRC32.hex(bundleCRC.value)), expected \(CRC32.hex(bundle.crc32))"
                        )
                    }
                    bundleCRC = CRC32()
                    bundleIndex += 1
                }
            }
            file.dropCache(offset: position, length: count)
            position = chunkEnd
            progress(position, total)
        }
        // Empty files at the very end have no bytes to visit.
        while spanIndex < spans.count {
            try finishSpan(spans[spanIndex], CRC32().value)
            spanIndex += 1
        }
        progress(total, total)
    }
}

extension TensorEntry {
    /// This tensor's bytes as a package stores them (`length` of them) as float32 in the source's
    /// element order for its orientation, whatever its dtype and however its rows are grouped.
    public func decode(_ bytes: UnsafeRawPointer, into out: UnsafeMutablePointer<Float>) {
        guard layout.isGrouped else {
            TensorCodec.decode(bytes, dtype: dtype, count: elementCount, into: out)
            return
        }
        let plain = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 64)
        defer { plain.deallocate() }
        layout.plainRows(bytes, into: plain.baseAddress!, rowBytes: length / rows, rowCount: rows)
        TensorCodec.decode(UnsafeRawPointer(plain.baseAddress!), dtype: dtype, count: elementCount, into: out)
    }
}
