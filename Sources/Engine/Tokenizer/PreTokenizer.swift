/// The Qwen2 split pattern, matched by hand (the regex engines available here either lack Unicode
/// property classes or are far too slow for this hot path):
///
///     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
///
/// At each position the alternatives are tried in order with the regex's own greedy/backtracking
/// outcome worked out per alternative (see the comments), and the text is cut at every match
/// ("Isolated": matches are pieces of their own; the pattern matches every character, so there
/// is never text between matches).
enum QwenPreTokenizer {
    static func isLetter(_ s: Unicode.Scalar) -> Bool {
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }

    static func isNumber(_ s: Unicode.Scalar) -> Bool {
        switch s.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }

    static func isSpace(_ s: Unicode.Scalar) -> Bool { s.properties.isWhitespace }
    static func isNewline(_ s: Unicode.Scalar) -> Bool { s == "\r" || s == "\n" }

    /// Splits `text` into pieces (as ranges of its scalars).
    static func split(_ scalars: [Unicode.Scalar]) -> [Range<Int>] {
        var pieces: [Range<Int>] = []
        var i = 0
        let n = scalars.count
        while i < n {
            let end = match(scalars, at: i)
            pieces.append(i..<end)
            i = end
        }
        return pieces
    }

    /// The end of the match starting at `i` (always > i).
    static func match(_ s: [Unicode.Scalar], at i: Int) -> Int {
        let n = s.count
        let c = s[i]
        // 1. (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == "'" && i + 1 < n {
            func lower(_ k: Int) -> Unicode.Scalar? {
                guard k < n else { return nil }
                switch s[k] {
                case "\u{17F}": return "s"  // ſ folds to s
                case let x where ("A"..."Z").contains(x): return Unicode.Scalar(x.value + 32)
                case let x: return x
                }
            }
            let a = lower(i + 1), b = lower(i + 2)
            if a == "s" || a == "t" || a == "m" || a == "d" { return i + 2 }
            if (a == "r" || a == "v") && b == "e" { return i + 3 }
            if a == "l" && b == "l" { return i + 3 }
        }
        // 2. [^\r\n\p{L}\p{N}]?\p{L}+
        var start2: Int? = nil
        if isLetter(c) {
            start2 = i
        } else if !isNewline(c) && !isNumber(c) && i + 1 < n && isLetter(s[i + 1]) {
            start2 = i + 1
        }
        if let start = start2 {
            var j = start
            while j < n && isLetter(s[j]) { j += 1 }
            return j
        }
        // 3. \p{N}
        if isNumber(c) { return i + 1 }
        // 4. ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        func isOther(_ x: Unicode.Scalar) -> Bool { !isSpace(x) && !isLetter(x) && !isNumber(x) }
        var start4: Int? = nil
        if c == " " && i + 1 < n && isOther(s[i + 1]) { start4 = i + 1 } else if isOther(c) { start4 = i }
        if let start = start4 {
            var j = start
            while j < n && isOther(s[j]) { j += 1 }
            while j < n && isNewline(s[j]) { j += 1 }
            return j
        }
        // From here c is whitespace. Its run:
        var runEnd = i
        while runEnd < n && isSpace(s[runEnd]) { runEnd += 1 }
        // 5. \s*[\r\n]+ : greedy \s* gives back characters until [\r\n]+ can match, so the match
        //    ends after the run's last newline (and [\r\n]+ then cannot extend past the run).
        var lastNewline = -1
        for k in i..<runEnd where isNewline(s[k]) { lastNewline = k }
        if lastNewline >= 0 { return lastNewline + 1 }
        // 6. \s+(?!\S) : the whole run at the end of the text, else the run minus its last char.
        if runEnd == n { return runEnd }
        if runEnd - i >= 2 { return runEnd - 1 }
        // 7. \s+
        return runEnd
    }
}
