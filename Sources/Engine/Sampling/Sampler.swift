#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How to choose the next token from the logits.
public struct SamplingParameters: Sendable, Equatable {
    /// 0 means greedy (always the most likely token).
    public var temperature: Float = 0.6
    /// Keep only the k most likely tokens (0: no limit).
    public var topK: Int = 20
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: no limit).
    public var topP: Float = 0.95
    /// Drop tokens less likely than min-p times the most likely one (0: no limit).
    public var minP: Float = 0
    /// Divide positive logits (multiply negative ones) of tokens already seen by this (1: off).
    public var repetitionPenalty: Float = 1
    /// OpenAI's penalties on generated tokens: a token's logit is lowered by `frequencyPenalty`
    /// times the times it was generated so far, and by `presencePenalty` once if it was (0: off).
    public var frequencyPenalty: Float = 0
    public var presencePenalty: Float = 0
    /// Added to the logits of these ids before anything else (OpenAI's `logit_bias`).
    public var logitBias: [Int: Float] = [:]
    public var seed: UInt64 = 0

    public init() {}

    public static var greedy: SamplingParameters {
        var p = SamplingParameters()
        p.temperature = 0
        return p
    }
}

/// Draws tokens: logit bias, repetition, frequency and presence penalties, then temperature, top-k,
/// top-p and min-p, then a seeded draw.
/// The same seed and inputs give the same tokens.
public struct Sampler: Sendable {
    public let parameters: SamplingParameters
    private var random: SplitMix64

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        random = SplitMix64(seed: parameters.seed)
    }

    /// Draws the next id. `history` is every id so far (the repetition penalty's); its last
    /// `generated` ones were generated (the frequency and presence penalties').
    public mutating func sample(_ logits: ArraySlice<Float>, history: [Int] = [], generated: Int = 0) -> Int {
        sample(scores: Array(logits), history: history, generated: generated)
    }

    public mutating func sample(_ logits: UnsafeBufferPointer<Float>, history: [Int] = [], generated: Int = 0) -> Int {
        sample(scores: Array(logits), history: history, generated: generated)
    }

    private mutating func sample(scores: [Float], history: [Int], generated: Int) -> Int {
        var scores = scores
        let p = parameters
        for (token, bias) in p.logitBias where scores.indices.contains(token) { scores[token] += bias }
        if p.repetitionPenalty != 1 {
            for token in Set(history) where scores.indices.contains(token) {
                scores[token] = scores[token] > 0 ? scores[token] / p.repetitionPenalty : scores[token] * p.repetitionPenalty
            }
        }
        if p.frequencyPenalty != 0 || p.presencePenalty != 0 {
            var counts: [Int: Int] = [:]
            for token in history.suffix(max(0, generated)) { counts[token, default: 0] += 1 }
            for (token, count) in counts where scores.indices.contains(token) {
                scores[token] -= p.frequencyPenalty * Float(count) + p.presencePenalty
            }
        }
        if p.temperature <= 0 { return LogitComparison.argmax(scores[...]) }
        // Candidates by decreasing score (ties: lower id first); with top-k, the k best found in
        // one pass, in the same order a full sort would give them.
        let before = { (a: Int, b: Int) in scores[a] > scores[b] || (scores[a] == scores[b] && a < b) }
        var order =
            p.topK > 0 && p.topK < scores.count ? firstInOrder(p.topK, of: scores.count, before: before) : scores.indices.sorted(by: before)
        let top = Double(scores[order[0]])
        var probabilities = order.map { exp((Double(scores[$0]) - top) / Double(p.temperature)) }
        var total = probabilities.reduce(0, +)
        probabilities = probabilities.map { $0 / total }
        if p.topP < 1 {
            var cumulative = 0.0, keep = 0
            repeat { cumulative += probabilities[keep]; keep += 1 } while keep < probabilities.count && cumulative < Double(p.topP)
            order = Array(order.prefix(keep))
            probabilities = Array(probabilities.prefix(keep))
        }
        if p.minP > 0 {
            let threshold = probabilities[0] * Double(p.minP)
            let keep = probabilities.firstIndex { $0 < threshold } ?? probabilities.count
            order = Array(order.prefix(max(1, keep)))
            probabilities = Array(probabilities.prefix(max(1, keep)))
        }
        total = probabilities.reduce(0, +)
        var draw = random.nextDouble() * total
        for (token, probability) in zip(order, probabilities) {
            draw -= probability
            if draw < 0 { return token }
        }
        return order.last!
    }
}

/// The `k` first of the ids `0..<count` in the order `before` gives, found in one pass (the same
/// ids, in the same order, as the first `k` of a full sort).
func firstInOrder(_ k: Int, of count: Int, before: (Int, Int) -> Bool) -> [Int] {
    guard k > 0 else { return [] }
    var order: [Int] = []
    order.reserveCapacity(k + 1)
    for i in 0..<count where order.count < k || before(i, order[order.count - 1]) {
        var low = 0, high = order.count
        while low < high {
            let middle = (low + high) / 2
            if before(order[middle], i) { low = middle + 1 } else { high = middle }
        }
        order.insert(i, at: low)
        if order.count > k { order.removeLast() }
    }
    return order
}

/// A small, fast, seedable generator (Steele, Lea and Flood's SplitMix64).
public struct SplitMix64: Sendable, RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    public mutating func nextDouble() -> Double { Double(next() >> 11) * 0x1p-53 }
}
