/// Text and JSON renderings of a quantisation plan and report (for stquant).
public enum QuantizationSummary {
    /// The per-tensor plan: dense tensors one by one, experts grouped by decision.
    public static func plan(_ plan: QuantizationPlan) -> String {
        let bundled = plan.manifest.bundleOfTensor
        var lines = [
            "policy: --type \(plan.policy.type.rawValue)"
                + (plan.policy.overrides.isEmpty
                    ? "" : ", overrides: " + plan.policy.overrides.map { "\($0.pattern)=\($0.type.rawValue)" }.joined(separator: " ")),
            ""
        ]
        lines.append("dense tensors:")
        for t in plan.manifest.tensors where bundled[t.name] == nil {
            let from = plan.source.tensor(t.name)!.dtype
            let d = plan.decisions[t.name]!
            lines.append("  \(t.name.padding(28)) \(from.rawValue.padding(5)) -> \(t.dtype.rawValue.padding(5)) \(d.reason)")
        }
        var groups: [String: Int] = [:]
        for t in plan.manifest.tensors where bundled[t.name] != nil {
            let kind = t.name.split(separator: ".").last.map(String.init) ?? t.name
            let key = "\(kind): \(plan.source.tensor(t.name)!.dtype.rawValue) -> \(t.dtype.rawValue) (\(plan.decisions[t.name]!.reason))"
            groups[key, default: 0] += 1
        }
        lines.append("expert tensors:")
        for (key, count) in groups.sorted(by: { $0.key < $1.key }) { lines.append("  \(count) × \(key)") }
        let fallbacks = fallbackText(plan)
        if !fallbacks.isEmpty { lines.append("falls back to f16: \(fallbacks)") }
        lines.append("")
        lines.append(
            "size: \(PackageSummary.bytes(plan.source.sourceBytes)) -> \(PackageSummary.bytes(plan.outputSize)); "
                + "\(plan.manifest.bundles.count) expert bundles of \(PackageSummary.bytes(plan.manifest.bundles.first?.length ?? 0)), "
                + "4096-aligned"
        )
        lines.append("nothing written (--dry-run)")
        return lines.joined(separator: "\n")
    }

    /// "layers.0.experts.0.gate (rows of 48 …), …", shortened when long.
    public static func fallbackText(_ plan: QuantizationPlan) -> String {
        let names = plan.manifest.tensors.filter { plan.decisions[$0.name]!.fellBack }.map(\.name)
        guard let first = names.first else { return "" }
        let reason = plan.decisions[first]!.reason
        return names.prefix(3).joined(separator: ", ") + (names.count > 3 ? " and \(names.count - 3) more" : "") + " (\(reason))"
    }

    public static func text(_ r: QuantizationReport, input: String, output: String, type: TensorDType) -> String {
        var lines = ["quantised \(input) -> \(output) (\(type.rawValue)) in \(Double(Int(r.seconds * 10)) / 10) s"]
        let ratio = Double(r.sizeAfter) / Double(max(r.sizeBefore, 1))
        lines.append(
            "size: \(PackageSummary.bytes(r.sizeBefore)) -> \(PackageSummary.bytes(r.sizeAfter)) (\(String(format2: ratio * 100))%), "
                + "\(String(format2: r.bitsPerWeight)) bits per weight"
        )
        lines.append("")
        lines.append("kind       tensors  dtype        rmse          max error     relative rmse")
        for g in r.byRole() {
            lines.append(
                "\(g.role.rawValue.padding(10)) \(String(g.tensors).padding(8)) "
                    + "\(g.dtypes.map(\.rawValue).joined(separator: "/").padding(12)) \(scientific(g.error.rmse).padding(13)) "
                    + "\(scientific(Double(g.error.maxAbsoluteError)).padding(13)) \(scientific(g.error.relativeRMSE))"
            )
        }
        return lines.joined(separator: "\n")
    }

    public static func json(_ r: QuantizationReport, output: String, type: TensorDType) -> JSONValue {
        func error(_ e: QuantizationError) -> [(String, JSONValue)] {
            [("rmse", .double(e.rmse)), ("max_error", .double(Double(e.maxAbsoluteError))), ("relative_rmse", .double(e.relativeRMSE))]
        }
        return .object(
            JSONObject([
                ("output", .string(output)), ("type", .string(type.rawValue)),
                ("size_before", .int(r.sizeBefore)), ("size_after", .int(r.sizeAfter)),
                ("bits_per_weight", .double(r.bitsPerWeight)), ("seconds", .double(r.seconds)),
                (
                    "kinds",
                    .array(
                        r.byRole().map { g in
                            .object(
                                JSONObject(
                                    [
                                        ("kind", .string(g.role.rawValue)), ("tensors", .int(g.tensors)),
                                        ("dtypes", .array(g.dtypes.map { .string($0.rawValue) }))
                                    ] + error(g.error)))
                        })
                ),
                (
                    "tensors",
                    .array(
                        r.tensors.map { t in
                            .object(
                                JSONObject(
                                    [
                                        ("name", .string(t.name)), ("from", .string(t.from.rawValue)), ("to", .string(t.to.rawValue)),
                                        ("bytes_before", .int(t.bytesBefore)), ("bytes_after", .int(t.bytesAfter))
                                    ] + error(t.error)))
                        })
                )
            ]))
    }

    /// 3 significant digits in scientific notation, without Foundation.
    public static func scientific(_ value: Double) -> String {
        guard value.isFinite else { return "\(value)" }
        if value == 0 { return "0" }
        var exponent = 0
        var mantissa = abs(value)
        while mantissa >= 10 { mantissa /= 10; exponent += 1 }
        while mantissa < 1 { mantissa *= 10; exponent -= 1 }
        var rounded = (mantissa * 100).rounded() / 100
        if rounded >= 10 { rounded /= 10; exponent += 1 }
        return (value < 0 ? "-" : "") + String(format2: rounded) + "e" + (exponent < 0 ? "-" : "+") + (abs(exponent) < 10 ? "0" : "")
            + String(abs(exponent))
    }
}
