import Foundation
import Testing
@testable import Engine

/// Running under a memory budget streams expert bundles through a small cache; the arithmetic is
/// the same, so the logits must be identical bit for bit to a session on the whole mapping that
/// also reads the experts as stored (`arrangeExperts: false`, which is what `strun` loads when
/// given a budget).
@Suite struct ExpertStreamingTests {
    /// A budget whose expert cache holds exactly `slots` bundles.
    static func budget(_ model: Model, slots: Int, context: Int, sequences: Int = 1, kvType: KVCacheType = .default) -> Int {
        let plan = MemoryPlan(model: model, contextLength: context, threads: 2, sequences: sequences, kvType: kvType)
        let slot = model.package.manifest.bundles.map(\.length).max()!
        return plan.fixedBytes + slots * slot
    }

    static let cases = Reference.models.flatMap { m in [TensorDType.f32, .q4_0].map { (m, $0) } }

    @Test(arguments: cases, DotKernels.InstructionSet.supported)
    func budgetedLogitsAreBitwiseIdentical(case: (model: String, type: TensorDType), tier: DotKernels.InstructionSet) throws {
        let (name, type) = `case`
        let reference = try Reference.load(name)
        let tokens = reference.sequences["long"]!.inputIDs
        let model = try Model(path: try Packages.path(name, type), arrangeExperts: false)
        let context = 128
        let free = try Session(model: model, contextLength: context, threads: 2, kernels: tier)
        var expected: [Float] = []
        for t in tokens { expected += try free.evaluate([t]) }
        let batchedExpected = try Session(model: model, contextLength: context, threads: 2, kernels: tier).evaluate(tokens, allLogits: true)
        let k = model.config.activeExperts
        let runs: [(Int, Bool, ExpertCache.CrossLayerMode)] = [
            (k, true, .off), (k, true, .on), (k + 3, true, .off), (k + 3, true, .on),
            (k + 3, false, .off), (model.config.expertCount * 2, true, .auto)
        ]
        for (slots, prefetch, crossLayer) in runs {
            let session = try Session(
                model: model, contextLength: context, threads: 2,
                memoryBudget: Self.budget(model, slots: slots, context: context), kernels: tier)
            let cache = try #require(session.expertCache)
            cache.prefetchEnabled = prefetch
            cache.crossLayer = crossLayer
            #expect(cache.slotCount == slots)
            var logits: [Float] = []
            for t in tokens {
                logits += try session.evaluate([t])
                #expect(cache.residentBytes <= cache.capacityBytes)
            }
            #expect(logits == expected, "\(slots) slots, prefetch \(prefetch), cross-layer \(crossLayer): decoding differs")
            let stats = cache.statistics
            #expect(stats.hits + stats.misses == tokens.count * model.config.layerCount * k, "one pick per chosen expert")
            if crossLayer == .off {
                #expect(stats.bytesRead == stats.misses * cache.slotBytes, "every miss is one whole-bundle read")
                #expect(stats.speculativeReads == 0 && stats.speculativeUsed == 0)
            } else {
                // Speculative reads still in flight when the last token ends are not counted yet.
                #expect(
                    stats.bytesRead >= stats.misses * cache.slotBytes
                        && stats.bytesRead <= (stats.misses + stats.speculativeReads) * cache.slotBytes,
                    "misses and speculative reads are whole-bundle reads: \(stats)")
            }
            if crossLayer == .on && name == Reference.trained && slots == k + 3 {
                #expect(stats.speculativeUsed > stats.speculativeWasted, "trained routing is predictable one layer early: \(stats)")
            }
            if slots >= model.config.layerCount * model.config.expertCount {
                #expect(
                    stats.misses <= model.config.layerCount * model.config.expertCount,
                    "a cache holding everything reads each bundle at most once")
            }
            // A batched prompt may choose more experts in a layer than there are slots: they run in groups.
            session.reset()
            let batched = try session.evaluate(tokens, allLogits: true)
            #expect(batched == batchedExpected, "\(slots) slots: batched prompt differs")
            session.expertCache?.shutdown()
        }
    }

    /// A cache nobody shuts down is freed when its last owner lets go, reads in flight or not: its
    /// I/O threads hold no reference to it, and its deinit stops and joins them before freeing
    /// the slots they read into.
    @Test func aReleasedCacheStopsItsThreadsAndIsFreed() throws {
        let model = try Model(path: try Packages.path("tiny-21b-like", .q4_0), arrangeExperts: false)
        let slot = model.package.manifest.bundles.map(\.length).max()!
        for inFlight in [false, true] {
            weak var released: ExpertCache?
            do {
                let cache = try ExpertCache(package: model.package, capacityBytes: 8 * slot, ioThreads: 4)
                released = cache
                if inFlight { try cache.prefetch(layer: 0, experts: Array(0..<8)) }
            }
            #expect(released == nil, "the cache outlived its owner (reads in flight: \(inFlight))")
        }
    }

    /// Eviction counts uses, not only recency: an expert used often survives a run of experts
    /// used once that would push it out of an LRU cache (LRU would evict it for the last of them).
    @Test func aFrequentlyUsedBundleOutlivesAScanOfNewOnes() throws {
        let model = try Model(path: try Packages.path("tiny-21b-like", .q4_0), arrangeExperts: false)
        let slot = model.package.manifest.bundles.map(\.length).max()!
        let slots = model.config.activeExperts
        let cache = try ExpertCache(package: model.package, capacityBytes: slots * slot)
        defer { cache.shutdown() }
        cache.crossLayer = .off
        func use(_ layer: Int, _ expert: Int) throws {
            try cache.prefetch(layer: layer, experts: [expert])
            _ = try cache.acquire(layer: layer, expert: expert)
            cache.release(layer: layer, experts: [expert])
        }
        for _ in 0..<10 { try use(0, 0) }
        for e in 1...slots { try use(1, e) }  // `slots` others, once each: LRU's victim for the last is (0, 0)
        cache.resetStatistics()
        try use(0, 0)
        #expect(cache.statistics.hits == 1, "the hot bundle was evicted: \(cache.statistics)")
        try use(1, 1)
        #expect(cache.statistics.misses == 1, "one of the scan went instead")
    }

    /// `.auto` cross-layer prefetch stops speculating when its guesses are not used, and `.on`
    /// does not; a guess that was right counts as a hit and as used.
    @Test func autoCrossLayerPrefetchPausesWhenItsGuessesAreWrong() throws {
        let model = try Model(path: try Packages.path("tiny-21b-like", .q4_0), arrangeExperts: false)
        let slot = model.package.manifest.bundles.map(\.length).max()!
        for mode in [ExpertCache.CrossLayerMode.auto, .on] {
            let cache = try ExpertCache(package: model.package, capacityBytes: 8 * slot)
            defer { cache.shutdown() }
            cache.crossLayer = mode
            cache.speculate(layer: 1, experts: [3])
            while !cache.isReady(layer: 1, expert: 3) { usleep(100) }
            try cache.prefetch(layer: 1, experts: [3])
            cache.release(layer: 1, experts: [3])
            #expect(cache.statistics.speculativeUsed == 1 && cache.statistics.hits == 1 && cache.statistics.misses == 0)
            var steps = 0
            while cache.crossLayerEnabled && steps < 100 {
                let layer = 2 + steps % 6
                cache.speculate(layer: layer, experts: [steps % 16])
                try cache.prefetch(layer: layer, experts: [(steps + 1) % 16])  // the guess was wrong
                _ = try cache.acquire(layer: layer, expert: (steps + 1) % 16)
                cache.release(layer: layer, experts: [(steps + 1) % 16])
                steps += 1
            }
            let stats = cache.statistics, wrong = stats.speculativeWasted + stats.speculativeCancelled
            if mode == .auto {
                #expect(
                    !cache.crossLayerEnabled && wrong >= 63 && steps <= 72,
                    "pauses once 64 guesses are judged, most wrong: \(steps) steps, \(stats)")
            } else {
                #expect(cache.crossLayerEnabled && steps == 100 && wrong >= 90, "\(stats)")
            }
        }
    }

    /// Where direct I/O is refused (tmpfs, some network file systems) reads go through the page
    /// cache and the pages are dropped after each read: the slots hold the same bytes (checked
    /// against each bundle's CRC), and an eight-slot session gives the unbudgeted logits.
    @Test func bufferedFallbackReadsTheSameBytes() throws {
        let model = try Model(path: try Packages.path("tiny-21b-like", .q4_0), arrangeExperts: false)
        let tokens = try Reference.load("tiny-21b-like").sequences["short"]!.inputIDs
        let expected = try Session(model: model, contextLength: 64, threads: 2).evaluate(tokens, allLogits: true)
        let slot = model.package.manifest.bundles.map(\.length).max()!
        let direct = try ExpertCache(package: model.package, capacityBytes: 8 * slot)
        let buffered = try ExpertCache(package: model.package, capacityBytes: 8 * slot, allowDirectIO: false)
        #expect(!buffered.directIO)
        for cache in [direct, buffered] {
            var bytes: [UInt8] = []
            try cache.prefetch(layer: 3, experts: [5])
            let p = try cache.acquire(layer: 3, expert: 5)
            let bundle = model.package.manifest.bundle(layer: 3, expert: 5)!
            bytes = Array(UnsafeRawBufferPointer(start: p, count: bundle.length))
            #expect(CRC32.checksum(bytes) == bundle.crc32, "the slot holds the bundle, byte for byte")
            cache.release(layer: 3, experts: [5])
            cache.shutdown()
        }
        let session = try Session(model: model, contextLength: 64, threads: 2, memoryBudget: Self.budget(model, slots: 8, context: 64))
        defer { session.expertCache?.shutdown() }
        #expect(try session.evaluate(tokens, allLogits: true) == expected)
    }

    @Test func aBudgetTooSmallForTheDensePartIsRefused() throws {
        let model = try Model(path: try Packages.path("tiny-4b-like"))
        let fixed = MemoryPlan(model: model, contextLength: 64, threads: 2).fixedBytes
        #expect {
            _ = try Session(model: model, contextLength: 64, threads: 2, memoryBudget: fixed - 1)
        } throws: { "\($0)".contains("cannot hold the dense part") }
        #expect {
            _ = try Session(model: model, contextLength: 64, threads: 2, memoryBudget: fixed + 1)
        } throws: { "\($0)".contains("one layer needs 4") }
    }

    @Test func aReadErrorSurfacesAsAnErrorNotAHang() throws {
        let scratch = Scratch()
        let copy = scratch.file("model.stpk")
        try FileManager.default.copyItem(atPath: try Packages.path("tiny-4b-like"), toPath: copy)
        let model = try Model(path: copy)
        let session = try Session(
            model: model, contextLength: 64, threads: 2,
            memoryBudget: Self.budget(model, slots: 6, context: 64))
        defer { session.expertCache?.shutdown() }
        // Cut the file inside the expert region after the package was opened.
        let bundles = model.package.manifest.bundles
        truncate(copy, off_t(bundles[bundles.count / 2].offset + 100))
        var failure: EngineError?
        do {
            for t in [5, 6, 7, 8, 9, 10] { _ = try session.evaluate([t]) }
        } catch {
            failure = error
        }
        let error = try #require(failure, "reading past the end must fail")
        #expect("\(error)".contains("cannot read the expert bundle of layer"))
        #expect("\(error)".contains("unexpected end of file"))
    }

    /// A package cut at its first expert bundle after opening: every read fails, with one
    /// layer's reads and the cross-layer guesses in flight on several I/O threads at once. Each
    /// evaluation fails with the bundle named (never a hang), again on the next try, and the
    /// cache stops cleanly. (The limit catches a hang; it is generous because a test waits for a
    /// thread while the suite's command tests hold them.)
    @Test(.timeLimit(.minutes(5)), arguments: ["tiny-4b-like", "tiny-21b-like"])
    func everyReadFailingWithSeveralInFlightIsAnErrorEachTime(model name: String) throws {
        let scratch = Scratch()
        let copy = scratch.file("model.stpk")
        try FileManager.default.copyItem(atPath: try Packages.path(name), toPath: copy)
        let model = try Model(path: copy)
        let session = try Session(
            model: model, contextLength: 64, threads: 2,
            memoryBudget: Self.budget(model, slots: 2 * model.config.activeExperts, context: 64))
        let cache = try #require(session.expertCache)
        truncate(copy, off_t(model.package.manifest.bundles.map(\.offset).min()!))
        for token in [5, 6, 7] {
            #expect {
                _ = try session.evaluate([token])
            } throws: {
                "\($0)".contains("cannot read the expert bundle of layer ") && "\($0)".contains(", expert ")
                    && "\($0)".contains("unexpected end of file")
            }
        }
        #expect(cache.statistics.bytesRead == 0)
        cache.shutdown()
    }

    @Test(arguments: [
        ("1073741824", 1_073_741_824), ("1GiB", 1 << 30), ("1.5GiB", 3 << 29), ("800MB", 800_000_000),
        ("512 MiB", 512 << 20), ("2G", 2 << 30), ("64k", 65536)
    ])
    func byteCountsParseWithUnits(text: String, bytes: Int) {
        #expect(ByteCount.parse(text) == bytes)
    }

    @Test(arguments: ["", "GiB", "-1GiB", "1 parsec", "0"])
    func badByteCountsAreRejected(text: String) {
        #expect(ByteCount.parse(text) == nil)
    }
}
