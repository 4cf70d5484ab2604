/// A JSON document as parsed by `JSONParser`.
///
/// Objects keep their keys in file order and a parser rejects duplicate keys: a safetensors header
/// that names a tensor twice is an error, not "last one wins". Numbers keep their source text so
/// that integers up to 2^63 are read exactly (a Double would round byte offsets past 2^53).
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(String)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    public var objectValue: JSONObject? { if case .object(let o) = self { o } else { nil } }
    public var arrayValue: [JSONValue]? { if case .array(let a) = self { a } else { nil } }
    public var stringValue: String? { if case .string(let s) = self { s } else { nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { b } else { nil } }
    public var isNull: Bool { self == .null }

    /// The value as an exact integer, or nil if it is not a number written as an integer
    /// (a number like `4.0` or `1e3` is accepted when it is integral and fits in Int).
    public var intValue: Int? {
        guard case .number(let text) = self else { return nil }
        if let i = Int(text) { return i }
        guard let d = Double(text), d.rounded() == d, abs(d) < 9.0e15 else { return nil }
        return Int(d)
    }

    public var doubleValue: Double? {
        guard case .number(let text) = self else { return nil }
        return Double(text)
    }

    public static func int(_ value: Int) -> JSONValue { .number(String(value)) }
    public static func double(_ value: Double) -> JSONValue { .number(JSONValue.format(value)) }

    /// Shortest text that reads back as the same Double; integral values keep a decimal point or
    /// exponent so that readers see a float.
    static func format(_ value: Double) -> String {
        precondition(value.isFinite, "JSON cannot represent \(value)")
        var text = "\(value)"  // Swift prints the shortest round-tripping representation.
        if !text.contains(".") && !text.contains("e") && !text.contains("E") { text += ".0" }
        return text
    }
}

/// A JSON object with its keys in the order they were written.
public struct JSONObject: Equatable, Sendable {
    public private(set) var keys: [String] = []
    private var storage: [String: JSONValue] = [:]

    public init() {}

    public init(_ pairs: [(String, JSONValue)]) {
        for (key, value) in pairs { self[key] = value }
    }

    public subscript(key: String) -> JSONValue? {
        get { storage[key] }
        set {
            if let newValue {
                if storage.updateValue(newValue, forKey: key) == nil { keys.append(key) }
            } else if storage.removeValue(forKey: key) != nil {
                keys.removeAll { $0 == key }
            }
        }
    }

    public var count: Int { keys.count }
    public var entries: [(key: String, value: JSONValue)] { keys.map { ($0, storage[$0]!) } }

    /// Inserts a key that must not already exist; returns false if it did.
    mutating func insertNew(_ key: String, _ value: JSONValue) -> Bool {
        guard storage[key] == nil else { return false }
        storage[key] = value
        keys.append(key)
        return true
    }
}
