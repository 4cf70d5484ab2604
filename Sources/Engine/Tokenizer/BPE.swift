/// Byte-pair encoding over byte-level symbols: start from single characters, repeatedly merge
/// the adjacent pair with the lowest merge rank (leftmost on ties), until no listed merge
/// applies. Symbols are token ids; a merge is (left id, right id) → (rank, merged id).
struct BPEModel {
    let vocabulary: [String: Int]
    let merges: [UInt64: (rank: Int32, merged: Int32)]
    /// Token id of each byte's byte-level character.
    let byteTokens: [Int32]

    @inline(__always) static func key(_ a: Int32, _ b: Int32) -> UInt64 {
        UInt64(UInt32(bitPattern: a)) << 32 | UInt64(UInt32(bitPattern: b))
    }

    /// Ids for one pre-tokenised piece, given as UTF-8 bytes.
    func encode(_ bytes: some Collection<UInt8>) -> [Int32] {
        var symbols = bytes.map { byteTokens[Int($0)] }
        while symbols.count > 1 {
            var best = Int32.max, at = -1, merged: Int32 = 0
            for k in 0..<symbols.count - 1 {
                if let m = merges[BPEModel.key(symbols[k], symbols[k + 1])], m.rank < best {
                    best = m.rank
                    at = k
                    merged = m.merged
                }
            }
            if at < 0 { break }
            symbols[at] = merged
            symbols.remove(at: at + 1)
        }
        return symbols
    }
}
