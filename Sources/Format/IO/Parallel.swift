import Dispatch

/// Carries a value (typically raw pointers into buffers the caller owns) into concurrently running
/// work. The caller guarantees that the workers touch disjoint parts and that the buffers outlive
/// the work, which `parallelFor` makes easy: it returns only when every worker has finished.
public struct Unchecked<Value>: @unchecked Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
}

/// Runs `body(i)` for i in 0..<count on up to `count` threads and waits for all of them.
public func parallelFor(_ count: Int, _ body: @Sendable (Int) -> Void) {
    if count == 1 { body(0); return }
    DispatchQueue.concurrentPerform(iterations: count, execute: body)
}
