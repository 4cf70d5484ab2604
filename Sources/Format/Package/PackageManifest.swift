/// One stored tensor (a row of the manifest's tensor directory).
public struct TensorEntry: Sendable, Equatable {
    /// Package name, e.g. `layers.3.experts.7.down`.
    public var name: String
    /// The Hugging Face tensor it came from.
    public var sourceName: String
    public var dtype: TensorDType
    /// Shape as stored, outermost first.
    public var shape: [Int]
    public var layout: TensorLayout
    /// Absolute byte offset in the package; a multiple of `PackageFormat.tensorAlignment`.
    public var offset: Int
    public var length: Int
    public var crc32: UInt32

    public init(
        name: String, sourceName: String, dtype: TensorDType, shape: [Int], layout: TensorLayout,
        offset: Int = 0, length: Int = 0, crc32: UInt32 = 0
    ) {
        self.name = name
        self.sourceName = sourceName
        self.dtype = dtype
        self.shape = shape
        self.layout = layout
        self.offset = offset
        self.length = length
        self.crc32 = crc32
    }

    public var elementCount: Int { shape.reduce(1, *) }
    public var rows: Int { shape.count >= 2 ? shape.dropLast().reduce(1, *) : 1 }
    public var rowLength: Int { shape.last ?? 1 }
}

/// One expert's gate, up and down matrices, stored as one aligned run of bytes.
public struct BundleEntry: Sendable, Equatable {
    public var layer: Int
    public var expert: Int
    /// A multiple of `PackageFormat.bundleAlignment`.
    public var offset: Int
    /// A multiple of `PackageFormat.bundleAlignment`; the bytes after the last tensor are zero.
    public var length: Int
    /// CRC-32 of all `length` bytes, padding included, so one read can be checked on its own.
    public var crc32: UInt32
    /// Tensor names in storage order: gate, up, down.
    public var tensors: [String]
}

/// A file stored verbatim (tokenizer.json, tokenizer_config.json, generation_config.json).
public struct FileEntry: Sendable, Equatable {
    public var name: String
    public var offset: Int
    public var length: Int
    public var crc32: UInt32
}

/// The package manifest: everything but the data.
public struct PackageManifest: Sendable, Equatable {
    public var config: ModelConfig
    /// In file order.
    public var tensors: [TensorEntry]
    /// In file order: layer-major, expert-minor.
    public var bundles: [BundleEntry]
    public var files: [FileEntry]
    /// Where the package came from: converter version, source files and sizes, quantiser.
    public var provenance: JSONObject

    public init(config: ModelConfig, tensors: [TensorEntry], bundles: [BundleEntry], files: [FileEntry], provenance: JSONObject) {
        self.config = config
        self.tensors = tensors
        self.bundles = bundles
        self.files = files
        self.provenance = provenance
    }

    /// A linear search; callers looking up many names should build their own index (the
    /// reader keeps one).
    public func tensor(named name: String) -> TensorEntry? {
        tensors.first { $0.name == name }
    }

    /// Tensor name → the expert bundle holding it (expert tensors only).
    public var bundleOfTensor: [String: BundleEntry] {
        var map: [String: BundleEntry] = [:]
        for b in bundles { for name in b.tensors { map[name] = b } }
        return map
    }

    /// The tensors outside the expert bundles, in file order.
    public var denseTensors: [TensorEntry] {
        let bundled = bundleOfTensor
        return tensors.filter { bundled[$0.name] == nil }
    }

    public func bundle(layer: Int, expert: Int) -> BundleEntry? {
        // Bundles are layer-major, expert-minor and complete, so the position is computed.
        let index = layer * config.expertCount + expert
        guard bundles.indices.contains(index), bundles[index].layer == layer, bundles[index].expert == expert else {
            return bundles.first { $0.layer == layer && $0.expert == expert }
        }
        return bundles[index]
    }

    public func file(named name: String) -> FileEntry? { files.first { $0.name == name } }

    // MARK: JSON

    public var json: JSONValue {
        var root = JSONObject()
        root["format"] = .string(PackageFormat.name)
        root["format_version"] = .string("\(PackageFormat.majorVersion).\(PackageFormat.minorVersion)")
        root["alignment"] = .object(
            JSONObject([
                ("tensor", .int(PackageFormat.tensorAlignment)),
                ("bundle", .int(PackageFormat.bundleAlignment))
            ]))
        root["config"] = config.json
        root["tensors"] = .array(
            tensors.map { t in
                .object(
                    JSONObject([
                        ("name", .string(t.name)), ("source_name", .string(t.sourceName)), ("dtype", .string(t.dtype.rawValue)),
                        ("shape", .array(t.shape.map { .int($0) })), ("layout", .string(t.layout.rawValue)),
                        ("offset", .int(t.offset)), ("length", .int(t.length)), ("crc32", .string(CRC32.hex(t.crc32)))
                    ]))
            })
        root["expert_bundles"] = .array(
            bundles.map { b in
                .object(
                    JSONObject([
                        ("layer", .int(b.layer)), ("expert", .int(b.expert)), ("offset", .int(b.offset)),
                        ("length", .int(b.length)), ("crc32", .string(CRC32.hex(b.crc32))),
                        ("tensors", .array(b.tensors.map { .string($0) }))
                    ]))
            })
        root["files"] = .array(
            files.map { f in
                .object(
                    JSONObject([
                        ("name", .string(f.name)), ("offset", .int(f.offset)), ("length", .int(f.length)),
                        ("crc32", .string(CRC32.hex(f.crc32)))
                    ]))
            })
        root["provenance"] = .object(provenance)
        return .object(root)
    }

    /// Parses a manifest. Checks types and value ranges of every field; cross-checks between
    /// fields and against the file are `PackageReader`'s job.
    public init(json: JSONValue, path: String) throws(FormatError) {
        func invalid(_ detail: String) -> FormatError { .malformedPackage(path: path, defect: .invalidManifest, detail: detail) }
        guard let root = json.objectValue else { throw invalid("the manifest is not a JSON object") }
        guard root["format"]?.stringValue == PackageFormat.name else { throw invalid("\"format\" is not \"\(PackageFormat.name)\"") }
        guard let configJSON = root["config"] else { throw invalid("\"config\" is missing") }
        do {
            config = try ModelConfig(json: configJSON, source: path)
        } catch {
            throw invalid("config: \(error.description)")
        }
        func objects(_ key: String) throws(FormatError) -> [JSONObject] {
            guard let array = root[key]?.arrayValue else { throw invalid("\"\(key)\" is missing or not a list") }
            var list: [JSONObject] = []
            for (i, item) in array.enumerated() {
                guard let object = item.objectValue else { throw invalid("\(key)[\(i)] is not an object") }
                list.append(object)
            }
            return list
        }
        func field<T>(_ object: JSONObject, _ key: String, _ where_: String, _ read: (JSONValue) -> T?) throws(FormatError) -> T {
            guard let value = object[key], let result = read(value) else {
                throw invalid("\(where_): \"\(key)\" is missing or has the wrong type")
            }
            return result
        }
        func offset(_ object: JSONObject, _ key: String, _ where_: String) throws(FormatError) -> Int {
            let value: Int = try field(object, key, where_) { $0.intValue }
            guard value >= 0 else { throw invalid("\(where_): \"\(key)\" is negative (\(value))") }
            return value
        }
        func crc(_ object: JSONObject, _ where_: String) throws(FormatError) -> UInt32 {
            try field(object, "crc32", where_) { $0.stringValue.flatMap(CRC32.parseHex) }
        }

        tensors = []
        for (i, object) in try objects("tensors").enumerated() {
            let name: String = try field(object, "name", "tensors[\(i)]") { $0.stringValue }
            let where_ = "tensor \(name)"
            let dtype: TensorDType = try field(object, "dtype", where_) { $0.stringValue.flatMap(TensorDType.init(rawValue:)) }
            let shapeValues: [JSONValue] = try field(object, "shape", where_) { $0.arrayValue }
            let shape = shapeValues.compactMap { $0.intValue }
            guard shape.count == shapeValues.count, (1...PackageFormat.maximumRank).contains(shape.count),
                shape.allSatisfy({ (1...PackageFormat.maximumDimension).contains($0) })
            else {
                throw invalid(
                    "\(where_): shape \(JSONWriter.serialize(.array(shapeValues))) must be 1 to \(PackageFormat.maximumRank) positive "
                        + "integers"
                )
            }
            tensors.append(
                TensorEntry(
                    name: name,
                    sourceName: try field(object, "source_name", where_) { $0.stringValue },
                    dtype: dtype,
                    shape: shape,
                    layout: try field(object, "layout", where_) { $0.stringValue.flatMap(TensorLayout.init(rawValue:)) },
                    offset: try offset(object, "offset", where_),
                    length: try offset(object, "length", where_),
                    crc32: try crc(object, where_)))
        }
        bundles = []
        for (i, object) in try objects("expert_bundles").enumerated() {
            let where_ = "expert_bundles[\(i)]"
            let names: [JSONValue] = try field(object, "tensors", where_) { $0.arrayValue }
            let tensorNames = names.compactMap { $0.stringValue }
            guard tensorNames.count == names.count else { throw invalid("\(where_): \"tensors\" must be a list of names") }
            bundles.append(
                BundleEntry(
                    layer: try offset(object, "layer", where_), expert: try offset(object, "expert", where_),
                    offset: try offset(object, "offset", where_), length: try offset(object, "length", where_),
                    crc32: try crc(object, where_), tensors: tensorNames))
        }
        files = []
        for (i, object) in try objects("files").enumerated() {
            let where_ = "files[\(i)]"
            files.append(
                FileEntry(
                    name: try field(object, "name", where_) { $0.stringValue },
                    offset: try offset(object, "offset", where_), length: try offset(object, "length", where_),
                    crc32: try crc(object, where_)))
        }
        provenance = root["provenance"]?.objectValue ?? JSONObject()
    }
}
