#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// Carries a value (typically raw pointers into buffers the caller owns) into concurrently running
/// work. The caller guarantees that the workers touch disjoint parts and that the buffers outlive
/// the work, which `parallelFor` makes easy: it returns only when every worker has finished.
public struct Unchecked<Value>: @unchecked Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
}

/// Runs `body(i)` for i in 0..<count on the calling thread and the shared worker pool, and waits
/// for all of them. Nested calls (from inside a body) run serially.
public func parallelFor(_ count: Int, _ body: (Int) -> Void) {
    WorkerPool.shared.run(count, body)
}

/// Persistent worker threads, one per core besides the caller's. A decoded token starts a few
/// hundred short parallel regions, so waking threads through the kernel each time would cost
/// more than the work: between regions the workers spin briefly on an atomic generation counter,
/// and only after ~0.2 ms without work do they sleep on a condition variable.
public final class WorkerPool: @unchecked Sendable {
    public static let shared = WorkerPool(workers: max(0, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))) - 1))

    public let workers: Int
    private let generation = Atomic<Int>(0)
    private let remaining = Atomic<Int>(0)
    private let busy = Atomic<Bool>(false)
    private let sleepers = Atomic<Int>(0)
    private var mutex = pthread_mutex_t()
    private var condition = pthread_cond_t()
    // Written by the caller before `generation` is bumped (release), read by workers after they
    // see the new generation (acquire).
    private nonisolated(unsafe) var job: ((Int) -> Void)?
    private nonisolated(unsafe) var participants = 0
    private nonisolated(unsafe) var count = 0

    init(workers: Int) {
        self.workers = workers
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&condition, nil)
        for index in 0..<workers {
            let context = Unmanaged.passRetained(WorkerContext(pool: self, index: index + 1)).toOpaque()
            var thread = pthread_t()
            pthread_create(
                &thread, nil,
                { raw in
                    let context = Unmanaged<WorkerContext>.fromOpaque(raw!).takeRetainedValue()
                    context.pool.workerLoop(context.index)
                    return nil
                }, context)
            pthread_detach(thread)
        }
    }

    private final class WorkerContext {
        let pool: WorkerPool
        let index: Int
        init(pool: WorkerPool, index: Int) { self.pool = pool; self.index = index }
    }

    func run(_ count: Int, _ body: (Int) -> Void) {
        guard count > 1, workers > 0, busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
            for i in 0..<count { body(i) }
            return
        }
        defer { busy.store(false, ordering: .releasing) }
        withoutActuallyEscaping(body) { escapable in
            let participants = min(count, workers + 1)
            job = escapable
            self.participants = participants
            self.count = count
            // Every worker acknowledges every generation (participant or not), so none can
            // still be reading this job's fields when the next one is set up.
            remaining.store(workers, ordering: .relaxed)
            generation.add(1, ordering: .sequentiallyConsistent)
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                pthread_mutex_lock(&mutex)
                pthread_cond_broadcast(&condition)
                pthread_mutex_unlock(&mutex)
            }
            var i = 0
            while i < count { escapable(i); i += participants }
            var spins = 0
            while remaining.load(ordering: .acquiring) > 0 { spinPause(&spins) }
            job = nil
        }
    }

    private func workerLoop(_ index: Int) {
        var seen = 0  // the initial generation: a run may start before this thread does
        while true {
            var spins = 0
            var current = generation.load(ordering: .acquiring)
            while current == seen {
                if spins < 200_000 {
                    spinPause(&spins)
                } else {
                    pthread_mutex_lock(&mutex)
                    sleepers.add(1, ordering: .sequentiallyConsistent)
                    while generation.load(ordering: .sequentiallyConsistent) == seen {
                        pthread_cond_wait(&condition, &mutex)
                    }
                    sleepers.subtract(1, ordering: .sequentiallyConsistent)
                    pthread_mutex_unlock(&mutex)
                    spins = 0
                }
                current = generation.load(ordering: .acquiring)
            }
            seen = current
            if index < participants, let job {
                var i = index
                while i < count { job(i); i += participants }
            }
            remaining.subtract(1, ordering: .releasing)
        }
    }
}

/// A short busy wait counting in the waiter's own `spins`; every 32768th call (some tens of
/// microseconds) gives the core away, so a spinning thread cannot starve the one it waits for if
/// another process takes a core. The pool never runs more threads than cores, so this is rare on
/// purpose: a yield is a system call, and yielding every microsecond or so cost ~4% of decode time
/// in the kernel's scheduler. (The count is per waiter: one shared by every thread was a data race.)
@inline(__always)
func spinPause(_ spins: inout Int) {
    spins &+= 1
    if spins & 32767 == 0 { sched_yield() }
}
