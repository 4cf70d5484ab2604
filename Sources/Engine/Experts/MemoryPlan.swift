/// What a session holds besides the expert cache, for `--memory-budget`: the dense tensors
/// (read through the mapping, so their pages become resident), every sequence's KV cache, the
/// working buffers and logits, and a fixed allowance for the process itself (binary, Swift
/// runtime, stacks, tokenizer).
public struct MemoryPlan: Sendable, CustomStringConvertible {
    public let denseBytes: Int
    public let kvCacheBytes: Int
    public let bufferBytes: Int
    public static let processAllowance = 64 << 20
    public let kvType: KVCacheType
    /// Bytes one layer's key (or value) for one key/value head and position takes.
    public let kvRowBytes: Int
    /// Each layer's window (nil: global), for what decoding reads from the cache.
    let windows: [Int?]
    let kvHeads: Int
    /// The package's bytes, and those of the largest expert bundle (one slot of an expert cache).
    public let packageBytes: Int
    public let slotBytes: Int
    let activeExperts: Int

    public var fixedBytes: Int { denseBytes + kvCacheBytes + bufferBytes + MemoryPlan.processAllowance }

    /// - Parameter sequences: sequences held at once (each has its KV cache and a row of logits).
    /// - Parameter kvType: what the KV caches store.
    public init(model: Model, contextLength: Int, threads: Int, sequences: Int = 1, kvType: KVCacheType = .default) {
        let c = model.config
        let manifest = model.package.manifest
        denseBytes =
            manifest.denseTensors.reduce(0) { $0 + $1.length }
            + manifest.files.reduce(0) { $0 + $1.length } + model.package.header.dataOffset
        let rowBytes = kvType.rowBytes(headDim: c.headDim) ?? 4 * c.headDim
        self.kvType = kvType
        kvRowBytes = rowBytes
        windows = model.layers.map(\.window)
        kvHeads = c.kvHeads
        packageBytes = model.package.header.fileLength
        slotBytes = ExpertCache.slotBytes(of: manifest)
        activeExperts = c.activeExperts
        kvCacheBytes =
            sequences
            * model.layers.reduce(0) { total, layer in
                total
                    + KVCache.bytes(
                        capacity: KVCache.capacity(context: contextLength, window: layer.window), heads: c.kvHeads, rowBytes: rowBytes)
            }
        // The session's list of buffers, its other objects' buffers, and logits (a step's row
        // per sequence, and the sampler's copies).
        bufferBytes =
            SessionBuffer.layout(c, threads: threads).bytes + SessionBuffer.objectBytes(c) + 4 * (2 + sequences) * c.vocabSize
    }

    /// The smallest memory budget: everything fixed plus one layer's chosen expert bundles.
    public var minimumBudget: Int { fixedBytes + activeExperts * slotBytes }

    /// Bytes of the KV cache one token adds to a sequence in every layer (a sliding-window layer
    /// stops growing at its window).
    public var kvBytesPerToken: Int { windows.count * 2 * kvHeads * kvRowBytes }

    /// Bytes of keys and values one decoded token reads at `depth` tokens of context: every
    /// layer's positions it sees (a sliding-window layer's last `window`).
    public func kvBytesRead(depth: Int) -> Int {
        windows.reduce(0) { $0 + 2 * kvHeads * kvRowBytes * min(depth, $1 ?? depth) }
    }

    /// How many sequences of this plan's context fit `budget` (this plan being one sequence's:
    /// each more adds its KV cache), 0 when not even one does.
    public func sequencesFitting(budget: Int) -> Int {
        let room = budget - minimumBudget
        return room < 0 ? 0 : 1 + room / max(1, kvCacheBytes)
    }

    /// What a user reads before running: each part's bytes at this context and sequence count,
    /// what the other KV cache types would take, and what a memory budget leaves for experts.
    public static func report(
        model: Model, contextLength: Int, threads: Int, sequences: Int, kvType: KVCacheType, memoryBudget: Int?
    ) -> String {
        func plan(_ type: KVCacheType, _ count: Int) -> MemoryPlan {
            MemoryPlan(model: model, contextLength: contextLength, threads: threads, sequences: count, kvType: type)
        }
        let b = PackageSummary.bytes, chosen = plan(kvType, sequences)
        let others = KVCacheType.allCases.filter { $0 != kvType && $0.rowBytes(headDim: model.config.headDim) != nil }
            .map { "\($0.rawValue) \(b(plan($0, sequences).kvCacheBytes))" }
        let mapped = chosen.packageBytes + chosen.kvCacheBytes + chosen.bufferBytes + MemoryPlan.processAllowance
        var lines = [
            "memory for \(sequences) sequence\(sequences == 1 ? "" : "s") of \(contextLength) tokens, \(threads) threads, KV cache "
                + "\(kvType):",
            "  KV cache       \(b(chosen.kvCacheBytes)) (\(b(chosen.kvBytesPerToken)) a token a sequence"
                + (others.isEmpty ? "" : "; \(others.joined(separator: ", "))") + ")",
            "  dense tensors  \(b(chosen.denseBytes))",
            "  buffers        \(b(chosen.bufferBytes))",
            "  the process    \(b(MemoryPlan.processAllowance))",
            "  in all         \(b(mapped)) at most with the whole package mapped; from \(b(chosen.minimumBudget)) with experts "
                + "streamed (--memory-budget)"
        ]
        if let memoryBudget {
            let fits = plan(kvType, 1).sequencesFitting(budget: memoryBudget)
            if memoryBudget >= chosen.minimumBudget {
                let room = memoryBudget - chosen.fixedBytes
                lines.append(
                    "  --memory-budget \(b(memoryBudget)): \(b(room)) for the expert cache (\(room / max(1, chosen.slotBytes)) bundles); "
                        + "up to \(fits) sequence\(fits == 1 ? "" : "s") of this context fit")
            } else {
                lines.append(
                    "  --memory-budget \(b(memoryBudget)) is too small: this needs \(b(chosen.minimumBudget)); "
                        + (fits > 0 ? "\(fits) sequence\(fits == 1 ? "" : "s") of this context fit" : "lower --context"))
            }
        }
        return lines.joined(separator: "\n")
    }

    public var description: String {
        "dense tensors (\(PackageSummary.bytes(denseBytes))), KV cache (\(PackageSummary.bytes(kvCacheBytes))), buffers "
            + "(\(PackageSummary.bytes(bufferBytes))) and the process (\(PackageSummary.bytes(MemoryPlan.processAllowance)))"
    }
}

/// A byte count with an optional unit: `1073741824`, `800MB`, `1.5GiB`, `512 MiB`, `2G`.
/// KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB (and bare K/M/G/T) powers of 1024.
public struct ByteCount: Sendable, Equatable, CustomStringConvertible {
    public let bytes: Int
    public let text: String

    /// nil for text that is not a positive size.
    public init?(_ text: String) {
        guard let bytes = ByteCount.parse(text) else { return nil }
        self.bytes = bytes
        self.text = text
    }

    public var description: String { text }

    public static func parse(_ text: String) -> Int? {
        let trimmed = text.filter { $0 != " " && $0 != "_" }
        let digits = trimmed.prefix { $0.isNumber || $0 == "." }
        guard !digits.isEmpty, let value = Double(digits), value > 0 else { return nil }
        let unit = trimmed.dropFirst(digits.count).lowercased()
        let scale: Double
        switch unit {
        case "", "b": scale = 1
        case "kb": scale = 1e3
        case "mb": scale = 1e6
        case "gb": scale = 1e9
        case "tb": scale = 1e12
        case "k", "kib": scale = 1024
        case "m", "mib": scale = 1024 * 1024
        case "g", "gib": scale = 1024 * 1024 * 1024
        case "t", "tib": scale = 1024 * 1024 * 1024 * 1024
        default: return nil
        }
        let bytes = value * scale
        guard bytes < 9e18 else { return nil }
        return Int(bytes)
    }
}
