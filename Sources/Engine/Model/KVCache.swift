import CKernels

/// What a KV cache stores keys and values as, llama.cpp's `-ctk`/`-ctv` choices: float32,
/// float16 (half the bytes; round to nearest even), or ggml's q8_0 blocks (a float16 scale and 32
/// int8s per 32 values: 8.5 bits a value). Queries, scores and sums stay float32.
public enum KVCacheType: String, Sendable, CaseIterable, CustomStringConvertible {
    case f32, f16, q8_0

    /// What sessions use unless told otherwise: as precise as the model needs at half of f32's
    /// memory (`KVCacheTests` and the README give the measured cost).
    public static let `default` = KVCacheType.f16

    var code: Int32 {
        switch self {
        case .f32: Int32(ST_KV_F32)
        case .f16: Int32(ST_KV_F16)
        case .q8_0: Int32(ST_KV_Q8_0)
        }
    }

    /// Bytes one key or value row of `headDim` values takes, nil when this type cannot hold it.
    public func rowBytes(headDim: Int) -> Int? {
        let bytes = Int(st_kv_row_bytes(code, Int32(clamping: headDim)))
        return bytes > 0 ? bytes : nil
    }

    /// Bits per stored value (for reports).
    public var bitsPerValue: Double {
        switch self {
        case .f32: 32
        case .f16: 16
        case .q8_0: 8.5
        }
    }

    public var description: String { rawValue }
}

/// Keys and values of one layer. Global layers keep every position; sliding-window layers keep
/// the last `window` (and a batch) in a ring.
final class KVCache: @unchecked Sendable {
    let capacity: Int
    let heads: Int
    let headDim: Int
    let window: Int?
    let type: KVCacheType
    /// Bytes of one head's key (or value) at one position.
    let rowBytes: Int
    /// (kv_heads, capacity, row): each key/value head's positions side by side, so the attention
    /// task of one head streams one contiguous range instead of every other half row.
    let keys: UnsafeMutableRawPointer
    let values: UnsafeMutableRawPointer

    /// Positions a layer's cache holds: every one, or for a sliding window its width plus a
    /// batch, so that storing a batch's keys before its queries read never overwrites a key one
    /// of them still needs.
    static func capacity(context: Int, window: Int?) -> Int {
        min(context, window.map { $0 + Session.maximumBatch } ?? context)
    }

    /// Bytes of keys and values of a cache of `capacity` positions.
    static func bytes(capacity: Int, heads: Int, rowBytes: Int) -> Int { 2 * capacity * heads * rowBytes }

    /// `type` must hold rows of `headDim` values (`KVCacheType.rowBytes`).
    init(capacity: Int, heads: Int, headDim: Int, window: Int?, type: KVCacheType) {
        self.capacity = capacity
        self.heads = heads
        self.headDim = headDim
        self.window = window
        self.type = type
        rowBytes = type.rowBytes(headDim: headDim)!
        keys = .allocate(byteCount: heads * capacity * rowBytes, alignment: 64)
        values = .allocate(byteCount: heads * capacity * rowBytes, alignment: 64)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    @inline(__always) func keys(head: Int) -> UnsafeMutableRawPointer { keys + head * capacity * rowBytes }
    @inline(__always) func values(head: Int) -> UnsafeMutableRawPointer { values + head * capacity * rowBytes }

    /// Stores the keys and values of every head (`heads · head_dim` floats each) at `position`.
    func store(key k: UnsafePointer<Float>, value v: UnsafePointer<Float>, position: Int) {
        let slot = position % capacity
        for h in 0..<heads {
            st_kv_store(type.code, k + h * headDim, keys(head: h) + slot * rowBytes, Int32(headDim))
            st_kv_store(type.code, v + h * headDim, values(head: h) + slot * rowBytes, Int32(headDim))
        }
    }

    /// What the cache holds for head `head` at `position` (keys, or values), as floats.
    func row(head: Int, position: Int, values fromValues: Bool = false) -> [Float] {
        let base = fromValues ? values(head: head) : keys(head: head)
        return [Float](unsafeUninitializedCapacity: headDim) { buffer, count in
            st_kv_load(type.code, base + position % capacity * rowBytes, buffer.baseAddress!, Int32(headDim))
            count = headDim
        }
    }
}
