import Engine
import Foundation
import Prometheus
import Synchronization

private func metric(_ name: String, _ help: String) -> MetricNameDescriptor {
    MetricNameDescriptor(metricName: name, unitName: "", helpText: help)
}

/// The server's Prometheus metrics. Requests are counted as they are answered; the generator's
/// counts are read from its statistics when `/metrics` is scraped.
final class ServerMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    /// Label values for `path`: the routes, and `other` for anything else (so a client cannot
    /// grow the label set).
    static let paths: Set<String> = [
        "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize", "/"
    ]

    /// What the previous scrape read, for the counters' increments.
    private struct Seen {
        var generator = BatchGenerator.Statistics()
        var cache = ExpertCache.Statistics()
        var scraped = ProgressReporter.monotonicSeconds()
    }
    private let seen = Mutex(Seen())

    private let promptTokens: Counter
    private let cachedPromptTokens: Counter
    private let generatedTokens: Counter
    private let steps: Counter
    private let stepSeconds: Counter
    private let finished: Counter
    private let waiting: Gauge
    private let running: Gauge
    private let parallel: Gauge
    private let rate: Gauge
    private let loaded: Gauge
    private let hits: Counter
    private let misses: Counter
    private let bytesRead: Counter
    private let hitRate: Gauge

    init() {
        promptTokens = registry.makeCounter(
            descriptor: metric(
                "strun_prompt_tokens_total", "Prompt tokens of requests given a sequence (those from the prompt cache included)."))
        cachedPromptTokens = registry.makeCounter(
            descriptor: metric(
                "strun_prompt_cached_tokens_total", "Prompt tokens a sequence already held (the prompt cache), not evaluated again."))
        generatedTokens = registry.makeCounter(descriptor: metric("strun_generated_tokens_total", "Tokens generated."))
        steps = registry.makeCounter(descriptor: metric("strun_steps_total", "Forward steps run (each serves every running request)."))
        stepSeconds = registry.makeCounter(descriptor: metric("strun_step_seconds_total", "Seconds spent in forward steps."))
        finished = registry.makeCounter(
            descriptor: metric("strun_generations_finished_total", "Generations ended (cancelled ones included)."))
        waiting = registry.makeGauge(descriptor: metric("strun_queue_depth", "Requests waiting for a free sequence."))
        running = registry.makeGauge(descriptor: metric("strun_active_sequences", "Requests generating now."))
        parallel = registry.makeGauge(descriptor: metric("strun_parallel_sequences", "Requests that can generate at once (--parallel)."))
        rate = registry.makeGauge(
            descriptor: metric("strun_generated_tokens_per_second", "Tokens generated per second since the previous scrape (all requests).")
        )
        loaded = registry.makeGauge(descriptor: metric("strun_model_loaded", "1 once the model is loaded and served."))
        hits = registry.makeCounter(
            descriptor: metric("strun_expert_cache_hits_total", "Expert reads served from the cache (--memory-budget)."))
        misses = registry.makeCounter(
            descriptor: metric("strun_expert_cache_misses_total", "Expert reads that went to storage (--memory-budget)."))
        bytesRead = registry.makeCounter(
            descriptor: metric("strun_expert_bytes_read_total", "Bytes of experts read from storage (--memory-budget)."))
        hitRate = registry.makeGauge(descriptor: metric("strun_expert_cache_hit_ratio", "Hits over reads of the expert cache since start."))
    }

    /// Counts an answered request.
    func count(path: String, method: String, status: Int) {
        let label = Self.paths.contains(path) ? path : "other"
        registry.makeCounter(
            descriptor: metric("strun_requests_total", "HTTP requests answered, by path, method and status."),
            labels: [("path", label), ("method", method), ("status", String(status))]
        ).increment()
    }

    /// The Prometheus text, brought up to date with `model`'s generator.
    func scrape(_ model: LoadedModel?) -> [UInt8] {
        if let model {
            let s = model.generator.statistics
            let cache = model.generator.expertCache?.statistics
            let now = ProgressReporter.monotonicSeconds()
            seen.withLock { seen in
                func add(_ counter: Counter, _ value: KeyPath<BatchGenerator.Statistics, Int>) {
                    counter.increment(by: Int64(max(0, s[keyPath: value] - seen.generator[keyPath: value])))
                }
                add(promptTokens, \.promptTokens)
                add(cachedPromptTokens, \.cachedPromptTokens)
                add(generatedTokens, \.generatedTokens)
                add(steps, \.steps)
                add(finished, \.finished)
                stepSeconds.increment(by: max(0, s.stepSeconds - seen.generator.stepSeconds))
                let interval = now - seen.scraped
                rate.set(to: interval > 0 ? Double(s.generatedTokens - seen.generator.generatedTokens) / interval : 0)
                if let cache {
                    hits.increment(by: Int64(max(0, cache.hits - seen.cache.hits)))
                    misses.increment(by: Int64(max(0, cache.misses - seen.cache.misses)))
                    bytesRead.increment(by: Int64(max(0, cache.bytesRead - seen.cache.bytesRead)))
                    hitRate.set(to: cache.hitRate)
                    seen.cache = cache
                }
                seen.generator = s
                seen.scraped = now
            }
            waiting.set(to: Double(s.waiting))
            running.set(to: Double(s.running))
            parallel.set(to: Double(model.generator.parallel))
            loaded.set(to: 1)
        } else {
            loaded.set(to: 0)
        }
        return registry.emitToBuffer()
    }
}
