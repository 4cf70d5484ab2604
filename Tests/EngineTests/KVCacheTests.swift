import Foundation
import Format
import Testing
@testable import Engine

/// The KV cache's types on the trained fixture (heads of 64, so q8_0 blocks fit; sliding-window
/// layers of 32 whose rings wrap): the fast path against the definition with the same cache
/// type, layer by layer; what float16 and q8_0 cost against float32 free-running over held-out
/// text; and the memory each takes.
@Suite struct KVCacheTests {
    static let model = Reference.trained

    /// Held-out text the model was not trained on, as ids.
    static func heldOut(_ model: Model, count: Int) throws -> [Int] {
        let tokenizer = try Tokenizer(json: try #require(model.package.fileContents("tokenizer.json")), path: "tokenizer.json")
        let text = try String(contentsOfFile: Reference.fixtures + "/trained/held-out-sample.txt", encoding: .utf8)
        return Array(tokenizer.encode(text).prefix(count))
    }

    /// Each layer given the definition's input adds what the definition (caching its keys and
    /// values in the same type) adds, on every tier, as a prompt and token by token, over 72
    /// positions (past the window of 32 and the 16-token attention tiles). Bounds: 1e-4 for
    /// float32, as ScalarForwardTests; 1e-3 for float16 and q8_0, where a value within float
    /// rounding of a rounding point may be stored one step apart.
    @Test(arguments: DotKernels.InstructionSet.supported)
    func theFastPathComputesTheDefinitionForEveryType(tier: DotKernels.InstructionSet) throws {
        let path = try Packages.path(Self.model, .f32)
        let model = try Model(path: path)
        let tokens = try Self.heldOut(model, count: 72)
        for type in KVCacheType.allCases {
            let expected = ScalarForward(package: try PackageReader(path: path), kvType: type).run(tokens)
            for batched in [true, false] {
                let forced = try TeacherForcing.run(model, kernels: tier, tokens: tokens, batched: batched, forcing: expected, kvType: type)
                let d = TeacherForcing.compare(expected, forced)
                let label = "\(type) KV cache, \(batched ? "prompt" : "token by token") on \(tier.name)"
                let bound: Float = type == .f32 ? 1e-4 : 1e-3
                #expect(d.worst < bound && d.routingMismatches.isEmpty && d.compared >= d.skipped * 20, "\(label): \(d)")
            }
        }
    }

    /// What the smaller caches cost, free-running over 512 held-out tokens (one prompt, so every
    /// attention tile and the window rings are used) against the float32 cache on the same tier,
    /// for float32 and Q4_0 weights: mean KL and top-1 agreement over every position, as
    /// `strun compare` reports them. Where a router choice is within rounding of a tie a smaller
    /// cache can flip it, and those flips (and what they change downstream) dominate the mean;
    /// where every layer chose the same experts, float16 with float32 weights is at rounding
    /// level. Measured on this fixture (AVX-512 tier; the others within a few percent):
    ///
    ///     cache  weights  mean KL  top-1   mean KL where routes agree
    ///     f16    f32      8.3e-5   100%    2.5e-7
    ///     f16    Q4_0     2.4e-4   99.8%   7.1e-5
    ///     q8_0   f32      6.3e-4   98.8%   2.1e-4
    ///     q8_0   Q4_0     3.8e-4   99.4%   2.0e-4
    ///
    /// (Q4_0 weights themselves cost a mean KL of 0.040 against float32 ones.)
    @Test(arguments: DotKernels.InstructionSet.supported)
    func smallerCachesCostAMeasuredLittle(tier: DotKernels.InstructionSet) throws {
        for weights in [TensorDType.f32, .q4_0] {
            let model = try Model(path: try Packages.path(Self.model, weights))
            let tokens = try Self.heldOut(model, count: 512)
            let base = try TeacherForcing.run(model, kernels: tier, tokens: tokens, batched: true, kvType: .f32)
            for (type, kl, top1, agreeingKL) in [(KVCacheType.f16, 6e-4, 0.99, 1e-5), (.q8_0, 2e-3, 0.98, 1e-3)] {
                let other = try TeacherForcing.run(model, kernels: tier, tokens: tokens, batched: true, kvType: type)
                let all = LogitComparison(base: base.logits, other: other.logits, vocab: model.config.vocabSize, tokens: tokens)
                let free = TeacherForcing.freeRunning(base, other, vocab: model.config.vocabSize, tie: 0.02)
                let label = "\(type) KV cache, \(weights.rawValue) weights, on \(tier.name)"
                print(
                    "\(label): mean KL \(all.meanKL), p99 \(all.p99KL), top-1 \(all.top1Agreement); where the routes agree: mean KL "
                        + "\(free.logits.meanKL), top-1 \(free.logits.top1Agreement)")
                #expect(all.meanKL > 0 && all.meanKL < kl && all.top1Agreement >= top1, "\(label): \(all.meanKL) \(all.top1Agreement)")
                if weights == .f32 {
                    #expect(free.logits.meanKL < agreeingKL, "\(label): mean KL \(free.logits.meanKL) where the routes agree")
                }
            }
        }
    }

    /// The memory plan follows the type: float16 is half of float32, q8_0 34/128 of it (ggml's
    /// block sizes), what a session reports is what it allocated, and under a budget the number
    /// of sequences that fit grows as the cache shrinks.
    @Test func theMemoryPlanFollowsTheType() throws {
        let model = try Model(path: try Packages.path(Self.model, .q4_0))
        let plans = KVCacheType.allCases.map { MemoryPlan(model: model, contextLength: 256, threads: 2, sequences: 3, kvType: $0) }
        #expect(plans[1].kvCacheBytes * 2 == plans[0].kvCacheBytes)
        #expect(plans[2].kvCacheBytes * 128 == plans[0].kvCacheBytes * 34)
        for type in KVCacheType.allCases {
            let session = try Session(model: model, contextLength: 256, threads: 2, sequences: 3, kvType: type)
            let allocated = session.sequences.reduce(0) { total, sequence in
                total + sequence.caches.reduce(0) { $0 + KVCache.bytes(capacity: $1.capacity, heads: $1.heads, rowBytes: $1.rowBytes) }
            }
            #expect(session.memoryPlan.kvCacheBytes == allocated && session.kvType == type)
        }
        // A budget that holds a few float32 sequences holds about twice as many in float16.
        let one = MemoryPlan(model: model, contextLength: 4096, threads: 2, sequences: 1, kvType: .f32)
        let budget = one.fixedBytes + 8 * one.kvCacheBytes
        func fits(_ type: KVCacheType) -> Int? {
            do {
                _ = try Session(model: model, contextLength: 4096, threads: 2, memoryBudget: budget, sequences: 64, kvType: type)
                return nil
            } catch {
                guard case .sequenceCount(_, let fits, _) = error else { return nil }
                return fits
            }
        }
        let f32 = try #require(fits(.f32)), f16 = try #require(fits(.f16))
        #expect(f32 >= 1 && f16 >= 2 * f32 - 1 && f16 <= 2 * f32 + 2, "\(f32) f32 sequences, \(f16) f16")
    }
}
