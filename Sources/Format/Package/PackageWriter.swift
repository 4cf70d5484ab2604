import Dispatch

/// Writes a package planned by `PackageLayout`, streaming.
///
/// Tensors and files are written in file order, each through a sink that accepts its bytes in any
/// chunking; the writer inserts alignment padding, computes every checksum on the way (tensor,
/// bundle, file, manifest, header) and never holds more than its two output buffers (one filling
/// while the other is written in the background, so storage writes overlap the caller's work —
/// the page cache takes buffered writes at only ~1 GB/s on the VMs here). Everything goes
/// to a temporary file beside the destination, renamed into place by `finish()`; a writer that is
/// dropped unfinished (an error anywhere) removes the temporary file, so no partial package is
/// ever left at the destination.
public final class PackageWriter {
    public let destination: String
    public let temporaryPath: String
    public private(set) var manifest: PackageManifest
    private let dataOffset: Int
    private let fileLength: Int
    private let file: SystemFile

    /// Items (tensors and files) in file order.
    private enum Item { case tensor(Int), file(Int) }
    private var items: [Item] = []
    private var nextItem = 0

    private var position: Int
    /// The buffer being filled (`filled` bytes, for the file from `bufferStart`) and the one a
    /// background write may still be reading.
    private var buffer: UnsafeMutableRawBufferPointer
    private var spare: UnsafeMutableRawBufferPointer
    private var filled = 0
    private var bufferStart: Int
    private let bufferCapacity: Int
    private let writes = DispatchGroup()
    private let writeOutcome = WriteOutcome()
    private var writing = false
    private var bundleCursor = 0
    private var bundleCRC = CRC32()
    private var finished = false

    /// - Parameters:
    ///   - overwrite: replace an existing destination (only once the new one is complete).
    ///   - bufferCapacity: bytes per buffer (two are kept); writes start at its multiples in the
    ///     file. Smaller only in tests, to exercise many background writes.
    public init(
        destination: String, manifest: PackageManifest, dataOffset: Int, overwrite: Bool,
        bufferCapacity: Int = 8 << 20
    ) throws(FormatError) {
        precondition(bufferCapacity > 0)
        self.bufferCapacity = bufferCapacity
        if FileSystem.exists(destination) && !overwrite { throw .outputExists(path: destination) }
        if FileSystem.isDirectory(destination) {
            throw .invalidRequest("\(destination) is a directory; give the path of the package file to write")
        }
        self.destination = destination
        self.manifest = manifest
        self.dataOffset = dataOffset
        fileLength = PackageLayout.fileLength(of: manifest, dataOffset: dataOffset)
        temporaryPath = FileSystem.temporaryPath(beside: destination)
        file = try SystemFile.createExclusive(temporaryPath, becoming: destination)
        position = dataOffset
        bufferStart = dataOffset
        buffer = .allocate(byteCount: bufferCapacity, alignment: 4096)
        spare = .allocate(byteCount: bufferCapacity, alignment: 4096)
        let ordered =
            manifest.tensors.indices.map { (manifest.tensors[$0].offset, Item.tensor($0)) }
            + manifest.files.indices.map { (manifest.files[$0].offset, Item.file($0)) }
        items = ordered.sorted { $0.0 < $1.0 }.map(\.1)
    }

    deinit {
        if writing { writes.wait() }
        if !finished { FileSystem.remove(temporaryPath) }
        buffer.deallocate()
        spare.deallocate()
    }

    private var tensorsWritten = 0

    /// How far the write has come: bytes, tensors, and the layer whose expert bundle is being
    /// written (nil in the dense part and the files).
    public var progress: WriteProgress {
        let layer =
            bundleCursor < manifest.bundles.count && position > manifest.bundles[bundleCursor].offset
            ? manifest.bundles[bundleCursor].layer : nil
        return WriteProgress(
            bytesWritten: finished ? fileLength : position, totalBytes: fileLength, tensorsWritten: tensorsWritten,
            layer: layer)
    }

    /// The tensor that must be written next, or nil when only files (or nothing) remain.
    public var nextTensorName: String? {
        guard nextItem < items.count, case .tensor(let i) = items[nextItem] else { return nil }
        return manifest.tensors[i].name
    }

    /// Writes tensor `name`, which must be the next item in file order. `body` gets a sink and
    /// must append exactly the tensor's byte length.
    public func writeTensor(_ name: String, _ body: (inout ByteSink) throws(FormatError) -> Void) throws(FormatError) {
        guard nextItem < items.count, case .tensor(let index) = items[nextItem], manifest.tensors[index].name == name else {
            preconditionFailure("tensor \(name) written out of order; next is \(nextTensorName ?? "a file")")
        }
        let entry = manifest.tensors[index]
        try padTo(entry.offset)
        var sink = ByteSink(writer: self, expected: entry.length, name: name)
        try body(&sink)
        guard sink.written == entry.length else {
            throw .invalidRequest("internal error: tensor \(name) got \(sink.written) bytes, expected \(entry.length)")
        }
        manifest.tensors[index].crc32 = sink.crc.value
        nextItem += 1
        tensorsWritten += 1
    }

    /// Writes the next embedded file.
    public func writeFile(_ name: String, contents: [UInt8]) throws(FormatError) {
        guard nextItem < items.count, case .file(let index) = items[nextItem], manifest.files[index].name == name else {
            preconditionFailure("file \(name) written out of order")
        }
        try padTo(manifest.files[index].offset)
        try withBytes(contents) { (raw) throws(FormatError) in try emit(raw) }
        manifest.files[index].crc32 = CRC32.checksum(contents)
        nextItem += 1
    }

    /// Writes the manifest and header, flushes to storage and renames into place.
    public func finish() throws(FormatError) {
        precondition(nextItem == items.count, "finish() before every tensor and file was written")
        try padTo(fileLength)
        try flush()
        try waitForWrite()
        precondition(bundleCursor == manifest.bundles.count)
        let manifestBytes = Array(JSONWriter.serialize(manifest.json).utf8)
        precondition(PackageFormat.headerLength + manifestBytes.count <= dataOffset, "manifest grew after planning")
        let header = PackageHeader(
            manifestLength: manifestBytes.count, dataOffset: dataOffset, fileLength: fileLength,
            manifestCRC32: CRC32.checksum(manifestBytes))
        // The region between the manifest's end and the data offset stays zero (sparse).
        try withBytes(header.encoded() + manifestBytes) { (raw) throws(FormatError) in try file.write(raw, at: 0) }
        try file.truncate(to: fileLength)
        try file.synchronize()
        try FileSystem.rename(temporaryPath, to: destination)
        finished = true
    }

    // MARK: Byte stream

    fileprivate func emit(_ bytes: UnsafeRawBufferPointer) throws(FormatError) {
        var rest = bytes
        while !rest.isEmpty {
            var take = rest.count
            // Buffers end on multiples of the capacity in the file, so every write after the
            // first starts 8 MiB-aligned: the page cache can then hold the package in huge folios,
            // which the runtime maps with 2 MiB pages (far fewer TLB misses when streaming weights).
            let boundary = (bufferStart / bufferCapacity + 1) * bufferCapacity
            take = min(take, boundary - position)
            if bundleCursor < manifest.bundles.count {
                let bundle = manifest.bundles[bundleCursor]
                if position < bundle.offset {
                    take = min(take, bundle.offset - position)
                } else {
                    take = min(take, bundle.offset + bundle.length - position)
                    bundleCRC.update(UnsafeRawBufferPointer(rebasing: rest[..<take]))
                }
            }
            UnsafeMutableRawBufferPointer(rebasing: buffer[filled..<(filled + take)]).copyMemory(
                from: UnsafeRawBufferPointer(rebasing: rest[..<take]))
            filled += take
            position += take
            rest = UnsafeRawBufferPointer(rebasing: rest[take...])
            if bundleCursor < manifest.bundles.count,
                position == manifest.bundles[bundleCursor].offset + manifest.bundles[bundleCursor].length
            {
                manifest.bundles[bundleCursor].crc32 = bundleCRC.value
                bundleCRC = CRC32()
                bundleCursor += 1
            }
            if position == boundary { try flush() }
        }
    }

    private static let zeros = [UInt8](repeating: 0, count: 64 << 10)

    private func padTo(_ offset: Int) throws(FormatError) {
        precondition(offset >= position, "layout overlap at \(offset)")
        while position < offset {
            let count = min(offset - position, PackageWriter.zeros.count)
            try withBytes(PackageWriter.zeros) { (raw) throws(FormatError) in
                try emit(UnsafeRawBufferPointer(rebasing: raw[..<count]))
            }
        }
    }

    /// Hands the filled buffer to a background write (after the previous one has finished) and
    /// carries on filling the other.
    private func flush() throws(FormatError) {
        guard filled > 0 else { return }
        try waitForWrite()
        swap(&buffer, &spare)
        let job = Unchecked((file, UnsafeRawBufferPointer(rebasing: spare[..<filled]), bufferStart, writeOutcome))
        bufferStart += filled
        filled = 0
        writing = true
        DispatchQueue.global().async(group: writes) {
            let (file, bytes, offset, outcome) = job.value
            do throws(FormatError) { try file.write(bytes, at: offset) } catch { outcome.error = error }
        }
    }

    /// Waits for the background write, if any, and throws its error.
    private func waitForWrite() throws(FormatError) {
        guard writing else { return }
        writes.wait()
        writing = false
        if let error = writeOutcome.error { throw error }
    }
}

/// Receives one tensor's bytes for a `PackageWriter`.
public struct ByteSink {
    fileprivate let writer: PackageWriter
    public let expected: Int
    public let name: String
    public fileprivate(set) var written = 0
    fileprivate var crc = CRC32()

    fileprivate init(writer: PackageWriter, expected: Int, name: String) {
        self.writer = writer
        self.expected = expected
        self.name = name
    }

    public mutating func append(_ bytes: UnsafeRawBufferPointer) throws(FormatError) {
        precondition(written + bytes.count <= expected, "tensor \(name): more bytes than its length \(expected)")
        crc.update(bytes)
        try writer.emit(bytes)
        written += bytes.count
    }
}

/// The error of a background write, read only after waiting for it.
private final class WriteOutcome: @unchecked Sendable {
    var error: FormatError?
}
