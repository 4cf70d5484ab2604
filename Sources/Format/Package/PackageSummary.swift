/// Human-readable renderings of a package plan or package, shared by `stconvert --dry-run`,
/// `stquant --dry-run` and `strun inspect`. Returns text; printing is the caller's business.
public enum PackageSummary {
    public static func bytes(_ count: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var value = Double(count)
        var unit = 0
        while value >= 1024 && unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(count) B" : String(format2: value) + " " + units[unit]
    }

    /// `version`: the file's format version (major, minor); nil for a plan, which will be written
    /// in the current one.
    public static func text(
        _ m: PackageManifest, dataOffset: Int, fileLength: Int, listTensors: Bool,
        version: (major: Int, minor: Int)? = nil
    ) -> String {
        let c = m.config
        var lines: [String] = []
        lines.append("model: SmallThinker, \(c.layerCount) layers, hidden \(c.hiddenSize), vocab \(c.vocabSize)")
        lines.append("attention: \(c.attentionHeads) heads / \(c.kvHeads) KV heads × \(c.headDim), rope_theta \(c.ropeTheta)")
        lines.append("  rope layout:    \(c.ropeLayout.map { $0 ? "1" : "0" }.joined())  (1 = RoPE, 0 = NoPE)")
        lines.append(
            "  window layout:  \(c.slidingWindowLayout.map { $0 ? "1" : "0" }.joined())  (1 = sliding window of \(c.slidingWindowSize))")
        lines.append(
            "experts: \(c.expertCount) per layer, top-\(c.activeExperts), ffn \(c.expertFFNSize), routing "
                + "\(c.routerSoftmax ? "softmax" : "sigmoid (normalised over the chosen)")"
        )
        lines.append(
            "embeddings: \(c.tieWordEmbeddings ? "tied to the output head" : "separate output head"); bos "
                + "\(c.bosTokenID.map(String.init) ?? "none"), eos \(c.eosTokenIDs); context \(c.maxPositionEmbeddings)"
        )

        let dense = m.denseTensors
        let denseBytes = dense.reduce(0) { $0 + $1.length }
        let expertBytes = m.bundles.reduce(0) { $0 + $1.length }
        let fileBytes = m.files.reduce(0) { $0 + $1.length }
        var dtypeCounts: [String: Int] = [:]
        for t in m.tensors { dtypeCounts[t.dtype.rawValue, default: 0] += 1 }
        lines.append("")
        let (major, minor) = version ?? (PackageFormat.majorVersion, PackageFormat.minorVersion)
        lines.append("file: \(bytes(fileLength)) (\(fileLength) bytes), format \(major).\(minor)")
        lines.append("  header + manifest: \(bytes(dataOffset))")
        lines.append("  dense tensors:     \(bytes(denseBytes)) in \(dense.count) tensors")
        lines.append(
            "  expert bundles:    \(bytes(expertBytes)) in \(m.bundles.count) bundles"
                + (m.bundles.first.map { " of \(bytes($0.length)) (4096-aligned, gate+up+down neuron-major)" } ?? ""))
        lines.append("  embedded files:    \(bytes(fileBytes)): \(m.files.map(\.name).joined(separator: ", "))")
        lines.append(
            "  tensor dtypes:     " + dtypeCounts.sorted { $0.key < $1.key }.map { "\($0.key) × \($0.value)" }.joined(separator: ", "))
        let q4 = m.tensors.filter { $0.dtype == .q4_0 && $0.shape.count == 2 }
        if !q4.isEmpty {
            let rows = q4.filter { $0.layout == .rowMajorX8 }.count, blocks = q4.filter { $0.layout == .rowMajorB8 }.count
            lines.append(
                "  q4_0 matrices:     \(rows) in groups of eight rows (row_major_x8), \(blocks) in rows of eight-block groups "
                    + "(row_major_b8), \(q4.count - rows - blocks) in plain rows"
            )
        }
        if let first = m.bundles.first, let last = m.bundles.last {
            lines.append("  expert region:     [\(first.offset), \(last.offset + last.length)), layer-major, expert-minor")
        }
        if listTensors {
            lines.append("")
            lines.append("dense tensors:")
            for t in dense { lines.append("  " + row(t)) }
            lines.append("expert bundles (per layer):")
            let dtypeOf = Dictionary(m.tensors.map { ($0.name, $0.dtype.rawValue) }, uniquingKeysWith: { a, _ in a })
            for layer in 0..<c.layerCount {
                let group = m.bundles.filter { $0.layer == layer }
                guard let a = group.first, let b = group.last else { continue }
                let dtypes = Set(group.flatMap { $0.tensors }.compactMap { dtypeOf[$0] }).sorted()
                lines.append(
                    "  layer \(layer): \(group.count) bundles, \(bytes(b.offset + b.length - a.offset)) at [\(a.offset), "
                        + "\(b.offset + b.length)), \(dtypes.joined(separator: "/"))"
                )
            }
        }
        return lines.joined(separator: "\n")
    }

    static func row(_ t: TensorEntry) -> String {
        let shape = "[" + t.shape.map(String.init).joined(separator: ", ") + "]"
        return "\(t.name.padding(28)) \(t.dtype.rawValue.padding(5)) \(shape.padding(14)) @\(t.offset) (\(bytes(t.length)))"
            + (t.layout == .rowMajor ? "" : " \(t.layout.rawValue)")
    }
}

extension String {
    /// Pads with spaces on the right to `width` characters.
    func padding(_ width: Int) -> String {
        count >= width ? self : self + String(repeating: " ", count: width - count)
    }

    /// A number with two decimals, without Foundation's formatter.
    public init(format2 value: Double) {
        let hundredths = Int((value * 100).rounded())
        let fraction = hundredths % 100
        self = "\(hundredths / 100).\(fraction < 10 ? "0" : "")\(fraction)"
    }
}
