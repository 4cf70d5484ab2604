/// One tensor as a safetensors header describes it.
public struct SafetensorsTensor: Sendable, Equatable {
    public let name: String
    public let dtype: TensorDType
    /// Outermost dimension first.
    public let shape: [Int]
    /// Absolute byte offset of the data in the file.
    public let offset: Int
    public let length: Int
    /// The file holding it.
    public let path: String
}

/// A safetensors file: an 8-byte little-endian header length, a JSON header, then the data.
///
/// Opening reads and checks only the header; tensor data is read on demand with positioned reads,
/// so a 40 GB checkpoint costs no more memory than its largest read. Every count, offset and
/// length from the header is checked against the file before anything is allocated from it.
public final class SafetensorsFile: @unchecked Sendable {
    /// The format's own limit on the header size.
    public static let maximumHeaderLength = 100 << 20
    public static let maximumRank = 8

    public let path: String
    public let fileSize: Int
    /// Tensors in header order.
    public let tensors: [SafetensorsTensor]
    let file: SystemFile

    public init(path: String) throws(FormatError) {
        self.path = path
        file = try SystemFile.openForReading(path)
        fileSize = try file.size()
        func defect(_ kind: SafetensorsDefect, _ detail: String) -> FormatError {
            .malformedSafetensors(path: path, defect: kind, detail: detail)
        }
        guard fileSize >= 8 else {
            throw defect(.truncated, "\(fileSize) bytes, but a safetensors file starts with an 8-byte header length")
        }
        let prefix = try file.read(count: 8, at: 0)
        let headerLength = prefix.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        guard headerLength >= 2, headerLength <= UInt64(SafetensorsFile.maximumHeaderLength), Int(headerLength) <= fileSize - 8 else {
            throw defect(
                .headerLengthOutOfRange,
                "header length \(headerLength) at byte 0, but the file has \(fileSize - 8) bytes after it (limit "
                    + "\(SafetensorsFile.maximumHeaderLength))"
            )
        }
        let headerBytes = try file.read(count: Int(headerLength), at: 8)
        let header: JSONValue
        do {
            header = try JSONParser.parse(headerBytes)
        } catch {
            let detail = error.reason.hasPrefix("duplicate key") ? "\(error.reason) (a tensor named twice)" : error.reason
            throw defect(.invalidHeaderJSON, "\(detail) at byte \(8 + error.offset)")
        }
        guard let object = header.objectValue else { throw defect(.invalidHeaderJSON, "the header is not a JSON object") }

        let dataStart = 8 + Int(headerLength)
        let dataLength = fileSize - dataStart
        var tensors: [SafetensorsTensor] = []
        for (name, value) in object.entries where name != "__metadata__" {
            guard let entry = value.objectValue,
                let dtypeName = entry["dtype"]?.stringValue,
                let shapeValues = entry["shape"]?.arrayValue,
                let offsets = entry["data_offsets"]?.arrayValue
            else {
                throw defect(.malformedEntry, "tensor \(name) needs \"dtype\", \"shape\" and \"data_offsets\"")
            }
            guard let dtype = TensorDType(safetensorsName: dtypeName) else {
                throw defect(.unsupportedDtype, "tensor \(name) has dtype \(dtypeName); expected BF16, F16 or F32")
            }
            let shape = shapeValues.compactMap { $0.intValue }
            guard shape.count == shapeValues.count, shape.allSatisfy({ $0 >= 0 }), shape.count <= SafetensorsFile.maximumRank else {
                throw defect(
                    .malformedEntry,
                    "tensor \(name) has shape \(JSONWriter.serialize(.array(shapeValues))); expected up to "
                        + "\(SafetensorsFile.maximumRank) non-negative integers"
                )
            }
            guard offsets.count == 2, let begin = offsets[0].intValue, let end = offsets[1].intValue else {
                throw defect(
                    .malformedEntry, "tensor \(name) has data_offsets \(JSONWriter.serialize(.array(offsets))); expected [begin, end]")
            }
            guard begin >= 0, begin <= end, end <= dataLength else {
                throw defect(
                    .offsetsOutOfRange, "tensor \(name) has data_offsets [\(begin), \(end)], but the data section has \(dataLength) bytes")
            }
            guard let expected = dtype.byteLength(shape: shape), expected == end - begin else {
                let expectedText = dtype.byteLength(shape: shape).map(String.init) ?? "more than fits"
                throw defect(
                    .byteLengthMismatch,
                    "tensor \(name) (\(dtypeName) \(shape)) needs \(expectedText) bytes, but its data_offsets span \(end - begin)")
            }
            tensors.append(
                SafetensorsTensor(name: name, dtype: dtype, shape: shape, offset: dataStart + begin, length: end - begin, path: path))
        }
        let byOffset = tensors.filter { $0.length > 0 }.sorted { $0.offset < $1.offset }
        for (previous, next) in zip(byOffset, byOffset.dropFirst()) where next.offset < previous.offset + previous.length {
            throw defect(.overlappingTensors, "tensors \(previous.name) and \(next.name) share bytes from offset \(next.offset)")
        }
        self.tensors = tensors
    }

    /// Reads `buffer.count` bytes of `tensor` starting `offset` bytes into its data.
    public func read(_ tensor: SafetensorsTensor, from offset: Int = 0, into buffer: UnsafeMutableRawBufferPointer) throws(FormatError) {
        precondition(tensor.path == path && offset >= 0 && offset + buffer.count <= tensor.length)
        try file.read(into: buffer, at: tensor.offset + offset)
    }

    /// Hints that the bytes just read will not be needed again.
    public func doneReading(_ tensor: SafetensorsTensor) {
        file.dropCache(offset: tensor.offset, length: tensor.length)
    }
}
