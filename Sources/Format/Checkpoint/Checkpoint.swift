/// A Hugging Face SmallThinker checkpoint folder, opened and checked against its own config.
///
/// Opening reads `config.json`, the shard index when there is one, and every safetensors header;
/// it reads no tensor data. Every problem is reported with the file, the tensor and what was
/// expected versus found.
public final class Checkpoint: @unchecked Sendable {
    public let directory: String
    public let config: ModelConfig
    /// Checkpoint tensors by Hugging Face name.
    public let tensors: [String: SafetensorsTensor]
    /// Open safetensors files by path.
    public let shards: [String: SafetensorsFile]
    /// Weight files and config, with their sizes: the package's provenance.
    public let sourceFiles: [(name: String, size: Int)]
    /// Files stored verbatim in the package when present (name → path).
    public let auxiliaryFiles: [(name: String, path: String)]

    public static let configFile = "config.json"
    public static let singleWeightsFile = "model.safetensors"
    public static let indexFile = "model.safetensors.index.json"
    public static let tokenizerFiles = ["tokenizer.json", "tokenizer_config.json"]
    public static let generationConfigFile = "generation_config.json"
    /// Largest JSON side file we read (a real tokenizer.json is about 11 MB).
    public static let maximumSideFileLength = 64 << 20

    /// - Parameter tokenizerDirectory: take the tokenizer files from here instead of the checkpoint.
    public init(directory: String, tokenizerDirectory: String? = nil) throws(FormatError) {
        self.directory = directory
        guard FileSystem.isDirectory(directory) else {
            throw .invalidCheckpoint(
                path: directory, defect: .missingFile, detail: "not a directory; expected a Hugging Face checkpoint folder")
        }
        let configPath = FileSystem.join(directory, Checkpoint.configFile)
        guard FileSystem.exists(configPath) else {
            throw .invalidCheckpoint(path: configPath, defect: .missingFile, detail: "no config.json in the checkpoint folder")
        }
        let configBytes = try FileSystem.readAll(configPath, limit: Checkpoint.maximumSideFileLength)
        let configJSON: JSONValue
        do {
            configJSON = try JSONParser.parse(configBytes)
        } catch {
            throw .invalidCheckpoint(path: configPath, defect: .invalidConfig, detail: "not valid JSON: \(error)")
        }
        config = try ModelConfig(json: configJSON, source: configPath)
        var sources: [(name: String, size: Int)] = [(Checkpoint.configFile, configBytes.count)]

        // Which files hold which tensors.
        let indexPath = FileSystem.join(directory, Checkpoint.indexFile)
        let singlePath = FileSystem.join(directory, Checkpoint.singleWeightsFile)
        var shardOf: [String: String]? = nil  // tensor → shard file name, from the index
        var shardNames: [String]
        if FileSystem.exists(indexPath) {
            let map = try Checkpoint.readIndex(indexPath)
            shardOf = map
            shardNames = Array(Set(map.values)).sorted()
            sources.append((Checkpoint.indexFile, try FileSystem.fileSize(indexPath)))
        } else if FileSystem.exists(singlePath) {
            shardNames = [Checkpoint.singleWeightsFile]
        } else {
            throw .invalidCheckpoint(
                path: directory, defect: .missingFile,
                detail: "no model.safetensors and no model.safetensors.index.json in the checkpoint folder")
        }

        var shards: [String: SafetensorsFile] = [:]
        var tensors: [String: SafetensorsTensor] = [:]
        for name in shardNames {
            let path = FileSystem.join(directory, name)
            guard FileSystem.exists(path) else {
                throw .invalidCheckpoint(
                    path: indexPath, defect: .missingShard, detail: "the index names shard \(name), which is not in the folder")
            }
            let shard = try SafetensorsFile(path: path)
            shards[path] = shard
            sources.append((name, shard.fileSize))
            for tensor in shard.tensors {
                if let other = tensors[tensor.name] {
                    throw .invalidCheckpoint(
                        path: path, defect: .duplicateTensor,
                        detail: "\(tensor.name) is in both \(Checkpoint.baseName(other.path)) and \(name)")
                }
                tensors[tensor.name] = tensor
            }
        }
        // The index must describe the shards exactly: Hugging Face loads through it, so a tensor
        // it misplaces or omits would silently be a different model there.
        for tensor in tensors.values.sorted(by: { $0.name < $1.name }) {
            let name = Checkpoint.baseName(tensor.path)
            if let shardOf, shardOf[tensor.name] != name {
                let said = shardOf[tensor.name].map { "the index puts it in \($0)" } ?? "the index does not list it"
                throw .invalidCheckpoint(path: tensor.path, defect: .unexpectedTensor, detail: "\(tensor.name) is in \(name), but \(said)")
            }
        }
        if let shardOf, let (name, shard) = shardOf.sorted(by: { $0.key < $1.key }).first(where: { tensors[$0.key] == nil }) {
            throw .invalidCheckpoint(
                path: FileSystem.join(directory, shard), defect: .missingTensor,
                detail: "the index puts \(name) in \(shard), but that shard does not contain it")
        }
        self.tensors = tensors
        self.shards = shards
        self.sourceFiles = sources

        var auxiliary: [(name: String, path: String)] = [(Checkpoint.configFile, configPath)]
        for name in Checkpoint.tokenizerFiles {
            let path = FileSystem.join(tokenizerDirectory ?? directory, name)
            if FileSystem.exists(path) {
                auxiliary.append((name, path))
            } else if tokenizerDirectory != nil && name == "tokenizer.json" {
                throw .invalidCheckpoint(path: path, defect: .missingFile, detail: "--tokenizer names a folder without tokenizer.json")
            }
        }
        let generationPath = FileSystem.join(directory, Checkpoint.generationConfigFile)
        if FileSystem.exists(generationPath) { auxiliary.append((Checkpoint.generationConfigFile, generationPath)) }
        auxiliaryFiles = auxiliary

        try checkTensors()
        if let tokenizer = auxiliary.first(where: { $0.name == "tokenizer.json" }) {
            try Checkpoint.checkTokenizer(tokenizer.path, fits: config)
        }
    }

    /// The tokenizer's ids (vocabulary and added tokens) must all be rows of the embedding.
    static func checkTokenizer(_ path: String, fits config: ModelConfig) throws(FormatError) {
        func mismatch(_ detail: String) -> FormatError { .invalidCheckpoint(path: path, defect: .tokenizerMismatch, detail: detail) }
        let bytes = try FileSystem.readAll(path, limit: maximumSideFileLength * 4)
        let json: JSONValue
        do {
            json = try JSONParser.parse(bytes)
        } catch {
            throw mismatch("not valid JSON: \(error)")
        }
        guard let vocab = json.objectValue?["model"]?.objectValue?["vocab"]?.objectValue else {
            throw mismatch("no model.vocab object; expected a Hugging Face tokenizer.json")
        }
        var maximum = (token: "", id: -1)
        for (token, value) in vocab.entries {
            guard let id = value.intValue, id >= 0 else { throw mismatch("vocab entry \(token) has id \(JSONWriter.serialize(value))") }
            if id > maximum.id { maximum = (token, id) }
        }
        for entry in json.objectValue?["added_tokens"]?.arrayValue ?? [] {
            if let id = entry.objectValue?["id"]?.intValue, id > maximum.id {
                maximum = (entry.objectValue?["content"]?.stringValue ?? "?", id)
            }
        }
        guard maximum.id < config.vocabSize else {
            throw mismatch(
                "token \(maximum.token) has id \(maximum.id), but the model has \(config.vocabSize) embedding rows (vocab_size); this "
                    + "tokenizer belongs to another model"
            )
        }
    }

    static func baseName(_ path: String) -> String {
        path.split(separator: "/").last.map(String.init) ?? path
    }

    private static func readIndex(_ path: String) throws(FormatError) -> [String: String] {
        func invalid(_ detail: String) -> FormatError { .invalidCheckpoint(path: path, defect: .invalidIndex, detail: detail) }
        let bytes = try FileSystem.readAll(path, limit: Checkpoint.maximumSideFileLength)
        let json: JSONValue
        do {
            json = try JSONParser.parse(bytes)
        } catch {
            throw invalid("not valid JSON: \(error)")
        }
        guard let map = json.objectValue?["weight_map"]?.objectValue else { throw invalid("no \"weight_map\" object") }
        var result: [String: String] = [:]
        for (tensor, value) in map.entries {
            guard let shard = value.stringValue, !shard.isEmpty, !shard.contains("/"), shard != "..", shard != "." else {
                throw invalid("weight_map[\"\(tensor)\"] is \(JSONWriter.serialize(value)); expected a file name in the checkpoint folder")
            }
            result[tensor] = shard
        }
        guard !result.isEmpty else { throw invalid("weight_map is empty") }
        return result
    }

    /// Every tensor the config calls for is present with the right shape, and nothing else is.
    private func checkTensors() throws(FormatError) {
        let expected = TensorNames.all(config)
        var expectedNames = Set<String>()
        for e in expected {
            expectedNames.insert(e.sourceName)
            guard let found = tensors[e.sourceName] else {
                let missing = expected.filter { tensors[$0.sourceName] == nil }
                let more = missing.count > 1 ? " (and \(missing.count - 1) more)" : ""
                throw .invalidCheckpoint(
                    path: directory, defect: .missingTensor, detail: "\(e.sourceName) is not in any weight file\(more)")
            }
            guard found.shape == e.sourceShape else {
                throw .invalidCheckpoint(
                    path: found.path, defect: .wrongShape,
                    detail: "\(e.sourceName) has shape \(found.shape); the config calls for \(e.sourceShape)")
            }
        }
        if let extra = tensors.keys.sorted().first(where: { !expectedNames.contains($0) }) {
            let path = tensors[extra]!.path
            let hint =
                extra == "lm_head.weight" ? " (tie_word_embeddings is true, so the config says there is no separate output head)" : ""
            throw .invalidCheckpoint(
                path: path, defect: .unexpectedTensor, detail: "\(extra) is not part of the model the config describes\(hint)")
        }
    }

    public func shard(for tensor: SafetensorsTensor) -> SafetensorsFile { shards[tensor.path]! }
}
