/// Everything that can go wrong reading or writing checkpoints and packages.
///
/// Each message says what went wrong, where (file, tensor, byte offset), what was expected and
/// what was found. The `defect` enums let tests and callers tell the cases apart without
/// matching on text.
public enum FormatError: Error, Equatable, CustomStringConvertible {
    /// A system call on `path` failed (`operation` is what we tried, `code` is errno).
    case io(path: String, operation: String, code: Int32)
    /// A safetensors file is not well formed.
    case malformedSafetensors(path: String, defect: SafetensorsDefect, detail: String)
    /// A checkpoint folder does not agree with its own config, or the config is unusable.
    case invalidCheckpoint(path: String, defect: CheckpointDefect, detail: String)
    /// A .stpk package is not well formed, or fails a checksum.
    case malformedPackage(path: String, defect: PackageDefect, detail: String)
    /// A GGUF file is not well formed, or not a SmallThinker model we can import.
    case malformedGGUF(path: String, defect: GGUFDefect, detail: String)
    /// The output exists and the caller did not ask to overwrite it.
    case outputExists(path: String)
    /// A value cannot be represented in the requested type (for example a bf16 weight past
    /// the float16 range).
    case unrepresentable(tensor: String, detail: String)
    /// The caller asked for something the data does not allow.
    case invalidRequest(String)

    public var description: String {
        switch self {
        case .io(let path, let operation, let code):
            return "\(path): cannot \(operation): \(systemErrorMessage(code))"
        case .malformedSafetensors(let path, let defect, let detail):
            return "\(path): malformed safetensors file (\(defect.rawValue)): \(detail)"
        case .invalidCheckpoint(let path, let defect, let detail):
            return "\(path): \(defect.rawValue): \(detail)"
        case .malformedPackage(let path, let defect, let detail):
            return "\(path): \(defect.rawValue): \(detail)"
        case .malformedGGUF(let path, let defect, let detail):
            return "\(path): \(defect.rawValue): \(detail)"
        case .outputExists(let path):
            return "\(path) already exists; pass --force to overwrite it"
        case .unrepresentable(let tensor, let detail):
            return "tensor \(tensor): \(detail)"
        case .invalidRequest(let detail):
            return detail
        }
    }
}

public enum SafetensorsDefect: String, Sendable {
    case truncated = "file too short"
    case headerLengthOutOfRange = "header length out of range"
    case invalidHeaderJSON = "header is not valid JSON"
    case malformedEntry = "malformed tensor entry"
    case unsupportedDtype = "unsupported dtype"
    case offsetsOutOfRange = "data offsets out of range"
    case overlappingTensors = "overlapping tensor data"
    case byteLengthMismatch = "byte length disagrees with dtype and shape"
}

public enum GGUFDefect: String, Sendable {
    case notGGUF = "not a GGUF file"
    case unsupportedVersion = "unsupported GGUF version"
    case truncated = "GGUF file truncated"
    case absurdCount = "count out of range"
    case stringPastEnd = "string runs past the end"
    case unknownValueType = "unknown metadata value type"
    case invalidValue = "invalid metadata value"
    case duplicate = "defined twice"
    case badDimensions = "bad tensor dimensions"
    case unsupportedTensorType = "unsupported tensor type"
    case misaligned = "misaligned tensor data"
    case tensorPastEnd = "tensor data past the end"
    case overlapping = "overlapping tensor data"
    case wrongArchitecture = "not a SmallThinker GGUF"
    case missingKey = "missing metadata key"
    case missingTensor = "missing tensor"
    case unexpectedTensor = "unexpected tensor"
    case wrongShape = "wrong tensor shape"
    case unsupportedLayout = "layout llama.cpp cannot represent"
}

public enum CheckpointDefect: String, Sendable {
    case missingFile = "missing file"
    case invalidConfig = "invalid config"
    case wrongModelType = "not a SmallThinker checkpoint"
    case invalidIndex = "invalid shard index"
    case missingShard = "missing shard"
    case duplicateTensor = "tensor defined twice"
    case missingTensor = "missing tensor"
    case unexpectedTensor = "unexpected tensor"
    case wrongShape = "wrong tensor shape"
    case unsupportedDtype = "unsupported tensor dtype"
    case tokenizerMismatch = "tokenizer does not fit the model"
}

public enum PackageDefect: String, Sendable {
    case notAPackage = "not a .stpk package"
    case unsupportedVersion = "unsupported package version"
    case truncated = "package truncated"
    case headerChecksum = "header checksum mismatch"
    case manifestChecksum = "manifest checksum mismatch"
    case invalidManifest = "invalid manifest"
    case rangeOutOfBounds = "byte range out of bounds"
    case overlappingRanges = "overlapping byte ranges"
    case misaligned = "misaligned data"
    case tensorChecksum = "tensor checksum mismatch"
    case bundleChecksum = "expert bundle checksum mismatch"
    case nonZeroPadding = "padding bytes are not zero"
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func systemErrorMessage(_ code: Int32) -> String {
    guard let text = strerror(code) else { return "error \(code)" }
    return String(cString: text)
}
