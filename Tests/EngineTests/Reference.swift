import Foundation
import Testing
@testable import Engine

/// The SmallThinker authors' reference outputs for a fixture (`Tests/Fixtures/README` in shared).
struct Reference {
    struct Sequence {
        let inputIDs: [Int]
        let logits: [[Float]]  // [T][vocab]
        let greedyTokens: [Int]
        let greedyMargins: [Float]
        let greedyStepLogits: [[Float]]  // [16][vocab]
        let topkExperts: [[[Int]]]  // [layers][T][k]
        let topkWeights: [[[Float]]]  // [layers][T][k]
        let layerInputs: [[Float]]  // [layers][T · hidden]: the residual stream entering each layer
        let routerLogits: [[Float]]  // [layers][T · experts]
        let finalNormOut: [Float]  // [T · hidden]: model.norm of the last layer's output

        /// The authors' run as a trace for `TeacherForcing`: every layer's input, margins and
        /// choices (the last layer's raw output is not in the fixture: its states are NaN).
        func trace(hidden: Int, active: Int) -> Trace {
            let t = inputIDs.count, experts = routerLogits[0].count / t
            let margins = routerLogits.map { layer in
                (0..<t).map { p -> Float in
                    let sorted = layer[p * experts..<(p + 1) * experts].sorted(by: >)
                    return sorted[active - 1] - sorted[active]
                }
            }
            return Trace(
                hidden: hidden, states: layerInputs + [[Float](repeating: .nan, count: t * hidden)], margins: margins,
                experts: topkExperts, logits: logits.flatMap { $0 })
        }
    }

    let sequences: [String: Sequence]

    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures").path
    static let root = fixtures + "/smallthinker-tiny"
    /// The authors' three random-weight fixtures, and the trained one (Fixtures/trained).
    static let models = ["tiny-4b-like", "tiny-21b-like", "tiny-untied", trained]
    static let trained = "trained-21b-like"

    /// A fixture's checkpoint folder.
    static func directory(_ model: String) -> String {
        model == trained ? fixtures + "/trained/" + trained : root + "/" + model
    }

    nonisolated(unsafe) private static var cache: [String: Reference] = [:]
    private static let lock = NSLock()

    static func load(_ model: String) throws -> Reference {
        lock.lock(); defer { lock.unlock() }
        if let cached = cache[model] { return cached }
        let data = try Data(contentsOf: URL(fileURLWithPath: directory(model) + "/reference.json"))
        let json = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let sequences = json["sequences"] as! [String: [String: Any]]
        var result: [String: Sequence] = [:]
        for (name, s) in sequences {
            result[name] = Sequence(
                inputIDs: s["input_ids"] as! [Int],
                logits: matrix(s["logits"]),
                greedyTokens: s["greedy_tokens"] as! [Int],
                greedyMargins: (s["greedy_top1_top2_margins"] as! [Double]).map(Float.init),
                greedyStepLogits: matrix(s["greedy_step_logits"]),
                topkExperts: s["topk_experts"] as! [[[Int]]],
                topkWeights: cube(s["topk_weights"]),
                layerInputs: matrix(s["layer_inputs"], rows: 1),
                routerLogits: matrix(s["router_logits"], rows: 1),
                finalNormOut: floats(s["final_norm_out"]).values)
        }
        let reference = Reference(sequences: result)
        cache[model] = reference
        return reference
    }

    static func floats(_ any: Any?) -> (values: [Float], shape: [Int]) {
        let object = any as! [String: Any]
        let bytes = Data(base64Encoded: object["b64"] as! String)!
        let values = bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        return (values, object["shape"] as! [Int])
    }

    /// The array's first `rows` dimensions as rows, the rest flattened in each.
    static func matrix(_ any: Any?, rows: Int = 1) -> [[Float]] {
        let (values, shape) = floats(any)
        let count = shape.prefix(rows).reduce(1, *), width = values.count / max(count, 1)
        return (0..<count).map { Array(values[$0 * width..<($0 + 1) * width]) }
    }

    static func cube(_ any: Any?) -> [[[Float]]] {
        let (values, shape) = floats(any)
        return (0..<shape[0]).map { a in
            (0..<shape[1]).map { b in
                let start = (a * shape[1] + b) * shape[2]
                return Array(values[start..<start + shape[2]])
            }
        }
    }
}

/// A scratch directory removed when dropped.
final class Scratch {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "engine-test-" + UUID().uuidString
        try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }
    func file(_ name: String) -> String { path + "/" + name }
}

/// Packages made once per test process and shared (conversion is deterministic).
enum Packages {
    nonisolated(unsafe) private static var made: [String: String] = [:]
    private static let lock = NSLock()
    private static let directory: String = {
        let path = NSTemporaryDirectory() + "engine-packages-\(getpid())"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }()

    /// dtype: nil (source, bf16), f32, q8_0 or q4_0; `plainRows`: Q4_0 in ggml's plain row
    /// order rather than row_major_x8 (`stquant --plain-rows`, and what format 1 stored).
    static func path(_ model: String, _ dtype: TensorDType? = nil, plainRows: Bool = false) throws -> String {
        lock.lock(); defer { lock.unlock() }
        let key = "\(model)-\(dtype?.rawValue ?? "source")\(plainRows ? "-plain" : "")"
        if let path = made[key] { return path }
        let output = directory + "/" + key + ".stpk"
        if let dtype, dtype.isQuantized {
            lock.unlock()
            let float = try path(model, .f32)
            lock.lock()
            let plan = try Quantizer.plan(
                source: try PackageReader(path: float), policy: QuantizationPolicy(type: dtype, groupedLayouts: !plainRows))
            try Quantizer.write(plan, to: output, overwrite: true, threads: 2)
        } else {
            let plan = try Converter.plan(checkpoint: try Checkpoint(directory: Reference.directory(model)), dtype: dtype)
            try Converter.write(plan, to: output, overwrite: true)
        }
        made[key] = output
        return output
    }
}

func maxAbsDifference(_ a: ArraySlice<Float>, _ b: [Float]) -> Float {
    zip(a, b).map { abs($0 - $1) }.max() ?? 0
}

/// Writes a float32 copy of a (quantised) package: same values as the quantised weights, so a
/// float computation over it is the "dequantise, then compute in float" reference for kernels.
func dequantizedCopy(of path: String, in scratch: Scratch) throws -> String {
    let source = try PackageReader(path: path)
    let bundleOf = source.manifest.bundleOfTensor
    let planned = source.manifest.tensors.map {
        PlannedTensor(
            name: $0.name, sourceName: $0.sourceName, dtype: .f32, shape: $0.shape, layout: $0.layout.orientation,
            bundle: bundleOf[$0.name].map { ($0.layer, $0.expert) })
    }
    let (manifest, dataOffset) = try PackageLayout.plan(
        config: source.manifest.config, tensors: planned,
        files: source.manifest.files.map { ($0.name, $0.length) }, provenance: JSONObject())
    let output = scratch.file("dequantized.stpk")
    let writer = try PackageWriter(destination: output, manifest: manifest, dataOffset: dataOffset, overwrite: false)
    for t in manifest.tensors {
        let from = source.tensor(t.name)!
        var values = [Float](repeating: 0, count: t.elementCount)
        values.withUnsafeMutableBufferPointer { source.decode(from, into: $0.baseAddress!) }
        try writer.writeTensor(t.name) { (sink) throws(FormatError) in
            var failure: FormatError?
            values.withUnsafeBytes { raw in
                do throws(FormatError) { try sink.append(raw) } catch { failure = error }
            }
            if let failure { throw failure }
        }
    }
    for f in manifest.files { try writer.writeFile(f.name, contents: source.fileContents(f.name)!) }
    try writer.finish()
    return output
}
