/// Element types a package can store. Float types hold one value per element; the quantised
/// types hold blocks of 32 values along each row (ggml's layouts, `specs/FORMAT.md`).
public enum TensorDType: String, Sendable, CaseIterable, Codable {
    case f32, f16, bf16
    case q8_0, q4_0

    /// Values per block: 1 for float types.
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16: 1
        case .q8_0, .q4_0: 32
        }
    }

    /// Bytes per block.
    public var blockBytes: Int {
        switch self {
        case .f32: 4
        case .f16, .bf16: 2
        case .q8_0: 34
        case .q4_0: 18
        }
    }

    public var isQuantized: Bool { blockSize > 1 }

    /// Bytes taken by a tensor of `shape` (outermost first), or nil when the innermost dimension
    /// cannot be split into blocks or the size overflows.
    public func byteLength(shape: [Int]) -> Int? {
        guard let rowLength = shape.last else { return blockBytes }  // a scalar
        guard shape.allSatisfy({ $0 >= 0 }), rowLength % blockSize == 0 else { return nil }
        var total = rowLength / blockSize * blockBytes
        for dimension in shape.dropLast() {
            let (product, overflow) = total.multipliedReportingOverflow(by: dimension)
            guard !overflow else { return nil }
            total = product
        }
        return total
    }

    /// The name safetensors uses for a float dtype.
    public init?(safetensorsName: String) {
        switch safetensorsName {
        case "F32": self = .f32
        case "F16": self = .f16
        case "BF16": self = .bf16
        default: return nil
        }
    }
}

/// How a stored tensor relates to the checkpoint tensor it came from.
public enum TensorLayout: String, Sendable, Codable {
    /// Same shape and element order as the source.
    case rowMajor = "row_major"
    /// The transpose of a 2-D source tensor (expert `down` matrices: neuron-major).
    case transposed
}
