#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How far one model's predictions are from another's over the same tokens, as llama.cpp users
/// know it from `llama-perplexity --kl-divergence`: KL(base ‖ other) per position (mean and 99th
/// percentile), top-1 agreement, the largest logit difference, and each model's perplexity.
public struct LogitComparison: Sendable {
    public let positions: Int
    public let meanKL: Double
    public let p99KL: Double
    public let maxKL: Double
    public let top1Agreement: Double
    public let maxAbsoluteDifference: Float
    /// exp(mean −log p(next token)), over the positions that have a next token.
    public let basePerplexity: Double
    public let otherPerplexity: Double

    /// - Parameters: logits of both models, [positions, vocab] row-major; the token sequence they
    ///   were computed on (position t predicts tokens[t + 1]).
    public init(base: [Float], other: [Float], vocab: Int, tokens: [Int]) {
        precondition(base.count == other.count && base.count % vocab == 0)
        let count = base.count / vocab
        var kls: [Double] = []
        var agree = 0
        var maxDiff: Float = 0
        var baseNLL = 0.0, otherNLL = 0.0
        for t in 0..<count {
            let a = base[t * vocab..<(t + 1) * vocab], b = other[t * vocab..<(t + 1) * vocab]
            let logA = LogitComparison.logSoftmax(a), logB = LogitComparison.logSoftmax(b)
            var kl = 0.0
            for i in 0..<vocab { kl += exp(logA[i]) * (logA[i] - logB[i]) }
            kls.append(max(0, kl))
            if LogitComparison.argmax(a) == LogitComparison.argmax(b) { agree += 1 }
            for (x, y) in zip(a, b) { maxDiff = max(maxDiff, abs(x - y)) }
            if t + 1 < tokens.count {
                baseNLL -= logA[tokens[t + 1]]
                otherNLL -= logB[tokens[t + 1]]
            }
        }
        positions = count
        meanKL = kls.reduce(0, +) / Double(max(count, 1))
        let sorted = kls.sorted()
        p99KL = sorted.isEmpty ? 0 : sorted[min(sorted.count - 1, Int((Double(sorted.count - 1) * 0.99).rounded(.up)))]
        maxKL = sorted.last ?? 0
        top1Agreement = Double(agree) / Double(max(count, 1))
        maxAbsoluteDifference = maxDiff
        let predicted = Double(max(1, min(count, tokens.count - 1)))
        basePerplexity = exp(baseNLL / predicted)
        otherPerplexity = exp(otherNLL / predicted)
    }

    static func logSoftmax(_ logits: ArraySlice<Float>) -> [Double] {
        let logSum = logSumExp(logits)
        return logits.map { Double($0) - logSum }
    }

    /// log Σ exp(logits), computed from the largest logit so nothing overflows.
    static func logSumExp(_ logits: some Collection<Float>) -> Double {
        let top = Double(logits.max()!)
        var sum = 0.0
        for x in logits { sum += exp(Double(x) - top) }
        return top + log(sum)
    }

    @inlinable public static func argmax<C: RandomAccessCollection<Float>>(_ logits: C) -> Int {
        var best = logits.startIndex
        for i in logits.indices where logits[i] > logits[best] { best = i }
        return logits.distance(from: logits.startIndex, to: best)
    }
}
