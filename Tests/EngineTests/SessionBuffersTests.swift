import Foundation
import Testing
@testable import Engine

/// The memory budget counts what a session allocates: every pointer a session holds lies in the
/// arena laid out from `SessionBuffer`'s list (one buffer each), and the plan's buffer bytes are
/// that arena, the activation batches the session holds, and the logits.
@Suite struct SessionBuffersTests {
    @Test(arguments: Reference.models)
    func theBudgetCountsEveryBufferTheSessionAllocates(model name: String) throws {
        let model = try Model(path: try Packages.path(name, .q4_0))
        for (threads, sequences) in [(1, 1), (3, 1), (2, 4)] {
            let session = try Session(model: model, contextLength: 64, threads: threads, sequences: sequences)
            let arena = session.arena
            var starts: [UnsafeMutableRawPointer] = [], batches = 0
            for child in Mirror(reflecting: session).children {
                let pointer: UnsafeMutableRawPointer? =
                    switch child.value {
                    case let p as UnsafeMutablePointer<Float>: UnsafeMutableRawPointer(p)
                    case let p as UnsafeMutablePointer<Int32>: UnsafeMutableRawPointer(p)
                    case let p as UnsafeMutablePointer<Int>: UnsafeMutableRawPointer(p)
                    case let p as UnsafeMutablePointer<ExpertPair>: UnsafeMutableRawPointer(p)
                    default: nil
                    }
                if let pointer {
                    #expect(
                        pointer >= arena.base && pointer < arena.base + arena.bytes,
                        "\(child.label ?? "?") is allocated outside the listed buffers")
                    starts.append(pointer)
                }
                if let batch = child.value as? ActivationBatch { batches += batch.allocatedBytes }
                if let routing = child.value as? ExpertAssignments {
                    batches += ExpertAssignments.bytes(experts: routing.experts, active: routing.active, batch: routing.batch)
                }
            }
            #expect(
                Set(starts).count == SessionBuffer.allCases.count,
                "\(starts.count) pointers for \(SessionBuffer.allCases.count) listed buffers")
            let plan = MemoryPlan(model: model, contextLength: 64, threads: threads, sequences: sequences)
            #expect(plan.bufferBytes == arena.bytes + batches + 4 * (2 + sequences) * model.config.vocabSize)
            // Every sequence's KV cache, as allocated.
            let caches = session.sequences.reduce(0) {
                $0 + $1.caches.reduce(0) { $0 + 2 * $1.capacity * $1.heads * $1.type.rowBytes(headDim: $1.headDim)! }
            }
            #expect(plan.kvCacheBytes == caches)
        }
    }
}
