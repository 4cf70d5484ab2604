#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Expert bundles streamed from the package into a fixed set of memory slots shared by all
/// layers, so a model larger than the memory budget still runs.
///
/// - Reads are whole bundles (one aligned, sequential read each: the package's layout) with
///   positioned reads, through direct I/O where the file system allows it and otherwise with the
///   cached pages dropped after each read, so the page cache does not quietly hold the model.
/// - `prefetch` is called as soon as a layer's router has chosen (before its attention runs): the
///   missing bundles go to I/O threads, and `acquire` waits only for reads not yet finished.
/// - `speculate` (cross-layer prefetch) reads bundles a layer is predicted to need one layer
///   early: the next layer's router applied to this layer's input. Those reads wait behind every
///   demand read, are not pinned, and the ones not started when the real choice arrives and
///   missed it are cancelled; a speculative bundle that is never used is the first evicted.
/// - Eviction is frequency-aware over all layers: the bundle with the fewest uses lately goes
///   (use counts halve every 128 layer steps; ties go to the least recently used). The
///   SmallThinker authors use plain LRU; over held-out text on the trained fixture this keeps
///   80.4% of choices in a cache of 97 of its 128 bundles against LRU's 75.2% (93.5% against
///   90.7% with 115), and matches LRU on the 4B-shaped skewed package at 1 GiB (98.5%).
///   Bundles in use by the current layer are pinned.
public final class ExpertCache: @unchecked Sendable {

    public struct Statistics: Sendable, Equatable {
        public var hits = 0
        public var misses = 0
        public var bytesRead = 0
        /// Time `acquire` spent waiting for reads.
        public var stallSeconds = 0.0
        /// Speculative (cross-layer) reads: made (or in flight), cancelled before they started
        /// because the real choice did not need them, later used by a real choice, and evicted
        /// unused.
        public var speculativeReads = 0
        public var speculativeCancelled = 0
        public var speculativeUsed = 0
        public var speculativeWasted = 0
        public var hitRate: Double { hits + misses > 0 ? Double(hits) / Double(hits + misses) : 0 }
        public init() {}
    }

    public let slotCount: Int
    public let slotBytes: Int
    public var capacityBytes: Int { slotCount * slotBytes }
    /// Whether reads bypass the page cache (O_DIRECT) or fall back to dropping cached pages.
    public let directIO: Bool
    /// Submit reads ahead (on by default; off for comparisons).
    public var prefetchEnabled = true
    /// Reading the bundles the next layer is predicted to need while this one computes
    /// (`speculate`): always, never, or while it pays (the default).
    public enum CrossLayerMode: String, Sendable, CaseIterable {
        case on, off
        /// Speculate while at least half of the speculative reads whose fate is known were used
        /// (cancelled ones count against: their slot was taken from something else):
        /// judged every 64 outcomes; below that, pause for 2048 layer steps, then try again,
        /// doubling the pause after each failed trial up to 65536 steps.
        /// Trained routing is predictable from the previous layer's input (88% of speculative
        /// reads used on the trained fixture); synthetic skewed routing is not (12%), and there
        /// speculation only adds reads.
        case auto
    }
    public var crossLayer: CrossLayerMode = .auto
    /// Whether the session should predict and call `speculate` now.
    public var crossLayerEnabled: Bool {
        switch crossLayer {
        case .on: return true
        case .off: return false
        case .auto: return prefetchEnabled && pausedSteps == 0
        }
    }
    private var recentUsed = 0, recentWasted = 0
    private var pausedSteps = 0
    private var pauseLength = 2048

    private let path: String
    private let descriptor: Int32
    private let experts: Int
    private let bundles: [BundleEntry]
    private let memory: UnsafeMutableRawPointer
    // Slot state, guarded by `mutex`.
    private var slotBundle: [Int]  // bundle index held (or being loaded), -1 if free
    private var slotReady: [Bool]
    private var slotError: [EngineError?]
    private var slotPinned: [Bool]  // in use by the current layer: not evictable
    private var slotLastUse: [UInt64]
    private var slotSpeculative: [Bool]  // read by `speculate` and not yet used by a real choice
    private var slotUses: [Int]  // uses, halved every `usesHalvingPeriod` layer steps
    /// Layer steps (`prefetch` calls) between halvings of the use counts: of the periods
    /// measured (128–2048 steps, halving or dividing by 4 to 256), halving every 128 gave the
    /// best hit rates on the trained fixture and matched LRU on the 4B-shaped skewed package.
    static let usesHalvingPeriod: UInt64 = 128
    private var bundleSlot: [Int]  // bundle index → slot, -1 if absent
    private var clock: UInt64 = 0
    private var queue: [(bundle: Int, slot: Int)] = []
    private var speculativeQueue: [(bundle: Int, slot: Int)] = []
    private var stats = Statistics()
    private var stopping = false
    private var mutex = pthread_mutex_t()
    private var ready = pthread_cond_t()
    private var work = pthread_cond_t()
    private var threads: [pthread_t] = []

    /// The size of one slot: the package's largest bundle.
    public static func slotBytes(of manifest: PackageManifest) -> Int {
        manifest.bundles.map(\.length).max() ?? PackageFormat.bundleAlignment
    }

    /// - Parameters: the package, and how many bytes of slots to use (at least one layer's top-k).
    /// - Parameter allowDirectIO: false forces the buffered fallback (for tests and comparisons).
    public init(package: PackageReader, capacityBytes: Int, ioThreads: Int = 4, allowDirectIO: Bool = true) throws(EngineError) {
        let c = package.manifest.config
        bundles = package.manifest.bundles
        experts = c.expertCount
        path = package.path
        slotBytes = ExpertCache.slotBytes(of: package.manifest)
        slotCount = capacityBytes / slotBytes
        guard slotCount >= c.activeExperts else {
            throw .budgetBelowOneLayer(slots: slotCount, slotBytes: slotBytes, needed: c.activeExperts)
        }
        var fd = allowDirectIO ? FileSystem.openUncached(package.path) ?? -1 : -1
        var direct = true
        if fd < 0 {
            direct = false
            fd = open(package.path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else {
                throw .io(path: package.path, detail: "cannot open for reading experts: \(String(cString: strerror(errno)))")
            }
        }
        descriptor = fd
        directIO = direct
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, PackageFormat.bundleAlignment, slotCount * slotBytes) == 0, let raw else {
            close(fd)
            throw .outOfMemory(bytes: slotCount * slotBytes, purpose: "the expert cache")
        }
        FileSystem.adviseHugePages(raw, count: slotCount * slotBytes)  // fewer TLB misses in the expert kernels
        // Touch every slot now: the kernel zero-fills a page on its first use, and leaving that to
        // the first read into each slot put hundreds of megabytes of page clearing (a fifth of
        // the decode time of a short run, in a profile) in the way of the first tokens.
        memset(raw, 0, slotCount * slotBytes)
        memory = raw
        slotBundle = Array(repeating: -1, count: slotCount)
        slotReady = Array(repeating: false, count: slotCount)
        slotError = Array(repeating: nil, count: slotCount)
        slotPinned = Array(repeating: false, count: slotCount)
        slotLastUse = Array(repeating: 0, count: slotCount)
        slotSpeculative = Array(repeating: false, count: slotCount)
        slotUses = Array(repeating: 0, count: slotCount)
        bundleSlot = Array(repeating: -1, count: bundles.count)
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&ready, nil)
        pthread_cond_init(&work, nil)
        for _ in 0..<max(1, ioThreads) {
            var thread = pthread_t()
            // The threads hold no reference: the cache's owner decides its lifetime, and
            // deinit stops and joins them before anything they use is freed.
            let context = Unmanaged.passUnretained(self).toOpaque()
            let started = pthread_create(
                &thread, nil,
                { raw in
                    Unmanaged<ExpertCache>.fromOpaque(raw!)._withUnsafeGuaranteedRef { $0.ioLoop() }
                    return nil
                }, context)
            // deinit (which runs when a fully initialised init throws) joins those started.
            guard started == 0 else { throw .io(path: path, detail: "cannot start an I/O thread: \(String(cString: strerror(started)))") }
            threads.append(thread)
        }
    }

    /// Stops the I/O threads, waiting for reads in flight (releasing the cache does it too).
    public func shutdown() {
        pthread_mutex_lock(&mutex)
        stopping = true
        pthread_cond_broadcast(&work)
        pthread_mutex_unlock(&mutex)
        for thread in threads { pthread_join(thread, nil) }
        threads.removeAll()
    }

    deinit {
        shutdown()
        free(memory)
        close(descriptor)
    }

    public var statistics: Statistics {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return stats
    }

    /// Bytes held in slots right now (always ≤ capacityBytes: the slots are allocated once).
    public var residentBytes: Int {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        return slotBundle.filter { $0 >= 0 }.count * slotBytes
    }

    public func resetStatistics() {
        pthread_mutex_lock(&mutex)
        stats = Statistics()
        pthread_mutex_unlock(&mutex)
    }

    // MARK: Requests

    /// Starts reading the bundles of `layer`'s `chosen` experts that are not resident. They are
    /// pinned until `release`.
    public func prefetch(layer: Int, experts chosen: some Sequence<Int>) throws(EngineError) {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        clock += 1
        if clock % ExpertCache.usesHalvingPeriod == 0 { for i in 0..<slotCount { slotUses[i] /= 2 } }
        if pausedSteps > 0 { pausedSteps -= 1 }
        // Speculative reads for this layer that have not started and that the real choice does
        // not want give their slots back.
        let wanted = Set(chosen.map { layer * experts + $0 })
        speculativeQueue.removeAll { job in
            guard bundles[job.bundle].layer == layer, !wanted.contains(job.bundle) else { return false }
            bundleSlot[job.bundle] = -1
            slotBundle[job.slot] = -1
            slotSpeculative[job.slot] = false
            stats.speculativeCancelled += 1
            stats.speculativeReads -= 1
            judge(used: false)  // no read, but it took a slot from something else
            return true
        }
        // Hits first, pinned, so that no miss of this layer can evict them.
        var missing: [Int] = []
        for bundle in wanted.sorted() {
            let slot = bundleSlot[bundle]
            if slot >= 0 {
                stats.hits += 1
                slotPinned[slot] = true
                slotLastUse[slot] = clock
                slotUses[slot] += 1
                if slotSpeculative[slot] {
                    slotSpeculative[slot] = false
                    stats.speculativeUsed += 1
                    judge(used: true)
                    // Still waiting behind demand reads: it is one now.
                    if let i = speculativeQueue.firstIndex(where: { $0.slot == slot }) { queue.append(speculativeQueue.remove(at: i)) }
                }
            } else {
                stats.misses += 1
                missing.append(bundle)
            }
        }
        // When every slot is pinned (a batch choosing more experts than fit), the rest are read
        // on demand by `acquire`, a group at a time.
        if prefetchEnabled {
            // One wake-up per read queued: on two cores, every I/O thread woken for nothing
            // preempts a compute thread.
            for bundle in missing where hasVictim {
                try startLoad(bundle)
                pthread_cond_signal(&work)
            }
        }
    }

    /// Starts reading, behind every demand read, the bundles of `layer`'s `predicted` experts
    /// that are not resident, into slots no current layer holds (the session calls it while
    /// `crossLayerEnabled`). They stay unpinned; `prefetch` for `layer` cancels those it does not
    /// want that have not started.
    public func speculate(layer: Int, experts predicted: some Sequence<Int>) {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        var started = false
        for e in predicted {
            let bundle = layer * experts + e
            guard bundleSlot[bundle] < 0, hasVictim, (try? startLoad(bundle, speculative: true)) != nil else { continue }
            started = true
        }
        if started { pthread_cond_signal(&work) }
    }

    /// The bundle of (`layer`, `expert`) in memory, waiting for its read (or, with prefetching
    /// off, reading it now). Call `prefetch` for the layer first: it counts hits and misses.
    public func acquire(layer: Int, expert: Int) throws(EngineError) -> UnsafeRawPointer {
        let bundle = layer * experts + expert
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        var slot = bundleSlot[bundle]
        if slot < 0 {
            slot = try startLoad(bundle)
            pthread_cond_signal(&work)
        } else if let i = speculativeQueue.firstIndex(where: { $0.slot == slot }) {
            queue.append(speculativeQueue.remove(at: i))  // needed now: a demand read
        }
        if !slotReady[slot] {
            let start = ProgressReporter.monotonicSeconds()
            while !slotReady[slot] { pthread_cond_wait(&ready, &mutex) }
            stats.stallSeconds += ProgressReporter.monotonicSeconds() - start
        }
        if let error = slotError[slot] {
            // Forget the failed slot so a later request retries, and report.
            slotError[slot] = nil
            slotReady[slot] = false
            bundleSlot[bundle] = -1
            slotBundle[slot] = -1
            slotPinned[slot] = false
            slotSpeculative[slot] = false
            throw error
        }
        slotPinned[slot] = true
        return UnsafeRawPointer(memory + slot * slotBytes)
    }

    /// Whether the bundle of (`layer`, `expert`) is in memory and read (`acquire` would not wait).
    public func isReady(layer: Int, expert: Int) -> Bool {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        let slot = bundleSlot[layer * experts + expert]
        return slot >= 0 && slotReady[slot] && slotError[slot] == nil
    }

    /// Unpins what `prefetch` and `acquire` pinned for this layer.
    public func release(layer: Int, experts chosen: some Sequence<Int>) {
        pthread_mutex_lock(&mutex)
        defer { pthread_mutex_unlock(&mutex) }
        for e in chosen {
            let slot = bundleSlot[layer * experts + e]
            if slot >= 0 { slotPinned[slot] = false }
        }
    }

    /// Records the fate of a speculative read for `.auto`. Caller holds the mutex.
    private func judge(used: Bool) {
        if used { recentUsed += 1 } else { recentWasted += 1 }
        guard recentUsed + recentWasted >= 64 else { return }
        if crossLayer == .auto && recentUsed < recentWasted {
            pausedSteps = pauseLength
            pauseLength = min(pauseLength * 2, 1 << 16)
        } else {
            pauseLength = 2048
        }
        recentUsed = 0
        recentWasted = 0
    }

    /// Whether a slot can be claimed now. Caller holds the mutex.
    private var hasVictim: Bool {
        (0..<slotCount).contains { slotBundle[$0] < 0 || (!slotPinned[$0] && slotReady[$0]) }
    }

    /// Claims a slot for `bundle` (evicting the least recently used unpinned one) and queues its
    /// read. Caller holds the mutex.
    @discardableResult
    private func startLoad(_ bundle: Int, speculative: Bool = false) throws(EngineError) -> Int {
        // A free slot if there is one, else the unpinned, finished one least used lately (fewest
        // uses since the counts were last halved, then least recently used; an unused
        // speculative bundle goes first of all).
        var victim = -1
        func age(_ s: Int) -> UInt64 { slotSpeculative[s] ? 0 : UInt64(min(slotUses[s], 1 << 20)) << 40 | slotLastUse[s] }
        for s in 0..<slotCount {
            if slotBundle[s] < 0 { victim = s; break }
            if !slotPinned[s] && slotReady[s] && (victim < 0 || age(s) < age(victim)) { victim = s }
        }
        guard victim >= 0 else {
            throw .cacheExhausted
        }
        if slotBundle[victim] >= 0 {
            bundleSlot[slotBundle[victim]] = -1
            if slotSpeculative[victim] { stats.speculativeWasted += 1; judge(used: false) }
        }
        slotBundle[victim] = bundle
        slotReady[victim] = false
        slotError[victim] = nil
        slotPinned[victim] = !speculative
        slotSpeculative[victim] = speculative
        slotLastUse[victim] = clock
        slotUses[victim] = 1
        bundleSlot[bundle] = victim
        if speculative {
            stats.speculativeReads += 1
            speculativeQueue.append((bundle, victim))
        } else {
            queue.append((bundle, victim))
        }
        return victim
    }

    // MARK: I/O threads

    private func ioLoop() {
        while true {
            pthread_mutex_lock(&mutex)
            while queue.isEmpty && speculativeQueue.isEmpty && !stopping { pthread_cond_wait(&work, &mutex) }
            if stopping { pthread_mutex_unlock(&mutex); return }
            let speculative = queue.isEmpty
            let job = speculative ? speculativeQueue.removeFirst() : queue.removeFirst()
            pthread_mutex_unlock(&mutex)

            let entry = bundles[job.bundle]
            let target = memory + job.slot * slotBytes
            var error: EngineError? = nil
            var done = 0
            while done < entry.length {
                let n = pread(descriptor, target + done, entry.length - done, off_t(entry.offset + done))
                if n < 0 && errno == EINTR { continue }
                if n <= 0 {
                    let reason = n == 0 ? "unexpected end of file" : String(cString: strerror(errno))
                    error = .io(
                        path: path,
                        detail:
                            "cannot read the expert bundle of layer \(entry.layer), expert \(entry.expert) at byte "
                            + "\(entry.offset + done): \(reason)"
                    )
                    break
                }
                done += n
            }
            if !directIO { FileSystem.dropCache(descriptor: descriptor, offset: entry.offset, length: entry.length) }

            pthread_mutex_lock(&mutex)
            slotError[job.slot] = error
            slotReady[job.slot] = true
            if error == nil { stats.bytesRead += entry.length }
            pthread_cond_broadcast(&ready)
            pthread_mutex_unlock(&mutex)
        }
    }
}
