#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Turns progress into one status line, rewritten in place at most five times a second. The
/// library only formats; the caller's `sink` decides where the text goes (stderr, when it is a
/// terminal).
public struct ProgressReporter {
    public let enabled: Bool
    private let sink: (String) -> Void
    private let start = ProgressReporter.monotonicSeconds()
    private var lastDraw = -1.0

    public init(enabled: Bool, sink: @escaping (String) -> Void) {
        self.enabled = enabled
        self.sink = sink
    }

    public mutating func update(done: Int, total: Int, label: String) {
        guard enabled else { return }
        let now = ProgressReporter.monotonicSeconds()
        guard now - lastDraw >= 0.2 || done >= total else { return }
        lastDraw = now
        let rate = Double(done) / max(now - start, 1e-6)
        let percent = total > 0 ? Int(Double(done) * 100 / Double(total)) : 100
        sink(
            "\r\u{1B}[K\(label)  \(percent)%  \(PackageSummary.bytes(done)) / \(PackageSummary.bytes(total))  "
                + "\(PackageSummary.bytes(Int(rate)))/s"
        )
    }

    /// Clears the status line.
    public func finish() {
        if enabled { sink("\r\u{1B}[K") }
    }

    public var elapsedSeconds: Double { ProgressReporter.monotonicSeconds() - start }

    public var elapsedText: String { "\(Double(Int(elapsedSeconds * 10)) / 10) s" }

    public static func monotonicSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
