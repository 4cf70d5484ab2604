extension SamplingParameters {
    /// Defaults from a Hugging Face `generation_config.json` (temperature, top_k, top_p, min_p,
    /// repetition_penalty; `do_sample: false` means greedy), falling back to the values
    /// SmallThinker's authors recommend: temperature 0.6, top-k 20, top-p 0.95.
    public static func defaults(generationConfig bytes: [UInt8]?) -> SamplingParameters {
        var p = SamplingParameters()
        guard let bytes, let object = (try? JSONParser.parse(bytes))?.objectValue else { return p }
        if let t = object["temperature"]?.doubleValue, t >= 0 { p.temperature = Float(t) }
        if let k = object["top_k"]?.intValue, k >= 0 { p.topK = k }
        if let top = object["top_p"]?.doubleValue, top > 0, top <= 1 { p.topP = Float(top) }
        if let m = object["min_p"]?.doubleValue, m >= 0, m < 1 { p.minP = Float(m) }
        if let r = object["repetition_penalty"]?.doubleValue, r > 0 { p.repetitionPenalty = Float(r) }
        if object["do_sample"]?.boolValue == false { p.temperature = 0 }
        return p
    }
}
