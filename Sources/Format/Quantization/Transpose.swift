/// Matrices turned over where two layouts disagree on orientation: the expert down matrices are
/// [hidden, ffn] in Hugging Face checkpoints and GGUF, [ffn, hidden] (neuron-major) in packages.
public enum Transpose {
    /// The [columns, rows] transpose of a [rows, columns] matrix of `elementSize`-byte elements,
    /// moved as bytes (exact, bit for bit, for any float type).
    public static func elements(
        _ source: UnsafeRawPointer, rows: Int, columns: Int, elementSize: Int, into target: UnsafeMutableRawPointer
    ) {
        for r in 0..<rows {
            for c in 0..<columns {
                (target + (c * rows + r) * elementSize).copyMemory(from: source + (r * columns + c) * elementSize, byteCount: elementSize)
            }
        }
    }

    /// A [rows, columns] matrix stored as `dtype` as its [columns, rows] transpose in `type`. The
    /// same float type moves as bytes; anything else (quantised blocks run along a row, so they
    /// cannot be moved) is decoded, transposed and encoded again.
    public static func matrix(
        _ source: UnsafeRawBufferPointer, dtype: TensorDType, rows: Int, columns: Int, as type: TensorDType, tensor: String
    ) throws(FormatError) -> [UInt8] {
        let count = rows * columns
        if dtype == type && !dtype.isQuantized {
            var out = [UInt8](repeating: 0, count: count * dtype.blockBytes)
            out.withUnsafeMutableBytes {
                elements(source.baseAddress!, rows: rows, columns: columns, elementSize: dtype.blockBytes, into: $0.baseAddress!)
            }
            return out
        }
        var floats = [Float](repeating: 0, count: count), transposed = floats
        floats.withUnsafeMutableBufferPointer { TensorCodec.decode(source.baseAddress!, dtype: dtype, count: count, into: $0.baseAddress!) }
        floats.withUnsafeBytes { f in
            transposed.withUnsafeMutableBytes {
                elements(f.baseAddress!, rows: rows, columns: columns, elementSize: 4, into: $0.baseAddress!)
            }
        }
        return try TensorCodec.encoded(transposed, as: type, tensor: tensor)
    }
}

extension TensorCodec {
    /// `values` encoded as `type`; a finite value that overflows a float type is an error naming
    /// `tensor`.
    public static func encoded(_ values: [Float], as type: TensorDType, tensor: String) throws(FormatError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: type.byteLength(shape: [values.count]) ?? 0)
        let overflow = values.withUnsafeBufferPointer { v in
            out.withUnsafeMutableBytes { encode(v.baseAddress!, count: values.count, as: type, into: $0.baseAddress!) }
        }
        if let overflow { throw .unrepresentable(tensor: tensor, detail: "value \(values[overflow]) overflows \(type.rawValue)") }
        return out
    }
}
