// libFuzzer target: strun serve's request decoding and prompt rendering. The first byte picks the
// endpoint (chat, completions, /tokenize, /detokenize), the rest is the body. A refusal must be a
// 4xx APIError whose body is valid JSON; an accepted request must be within the limits the server
// relies on, render through the chat template and tokenize (the Qwen tokenizer, loaded once),
// and its responses (a stream chunk and a whole response) must be valid JSON.
import Engine
import Format
import OpenAICompatible

let served = ServedModel(id: "example", contextLength: 4096, vocabularySize: 151_936, defaults: SamplingParameters(), created: 0)

@_cdecl("LLVMFuzzerInitialize")
public func initialize(
    _ argc: UnsafeMutablePointer<Int32>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>
) -> Int32 {
    _ = qwen.vocabularySize
    return 0
}

func mustBeJSON(_ text: String, _ what: String) {
    guard (try? JSONParser.parse(text)) != nil else { fatalError("\(what) is not valid JSON: \(text)") }
}

func checkAccepted(_ request: CompletionRequest) {
    let g = request.generation, s = g.sampling
    guard (1...served.contextLength).contains(g.maximumTokens), (0...2).contains(s.temperature), s.topP > 0, s.topP <= 1,
        s.topK >= 0, (0...1).contains(s.minP), (-2...2).contains(s.frequencyPenalty), (-2...2).contains(s.presencePenalty),
        s.repetitionPenalty > 0, g.stopStrings.count <= RequestLimits.stopStrings,
        s.logitBias.keys.allSatisfy({ (0..<served.vocabularySize).contains($0) }),
        (g.logprobs ?? 0) >= 0, (g.logprobs ?? 0) <= TokenLogprob.maximumAlternatives
    else { fatalError("accepted a request outside the limits: \(request)") }
    switch g.prompt {
    case .chat(let messages):
        let ids = qwen.encode(ChatTemplate.render(messages))
        guard !ids.isEmpty, ids.allSatisfy({ qwen.bytes(of: $0) != nil }) else { fatalError("the rendered chat does not tokenize") }
    case .text(let text):
        _ = qwen.encode(text)
    case .tokens(let ids):
        guard ids.allSatisfy({ (0..<served.vocabularySize).contains($0) }) else { fatalError("accepted an id outside the vocabulary") }
    }
    var responder = CompletionResponder(request: request, model: served, id: "x", created: 0) { qwen.bytes(of: $0) ?? [] }
    let logprob = TokenLogprob(token: 9, logprob: -.infinity, alternatives: [.init(token: 151_643, logprob: -0.5)])
    let summary = GenerationSummary(
        reason: .maximumTokens, promptTokens: 3, cachedTokens: 1, generatedTokens: 1, timeToFirstToken: 0, queuedSeconds: 0,
        decodeSeconds: 0)
    for chunk in responder.chunks(for: GenerationPiece(text: "\u{0}\"é", token: 9, logprob: logprob)) { mustBeJSON(chunk, "a chunk") }
    responder.add(GenerationPiece(text: "", token: nil, finish: summary))
    mustBeJSON(responder.response(summary), "a response")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzRequest(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let body = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    do {
        switch data[0] % 4 {
        case 0: checkAccepted(try RequestParser.chat(body, model: served) { 1 })
        case 1: checkAccepted(try RequestParser.completion(body, model: served) { 1 })
        case 2:
            let (content, _) = try RequestParser.tokenize(body)
            _ = qwen.encode(content)
        default:
            let ids = try RequestParser.detokenize(body, vocabulary: served.vocabularySize)
            _ = try? qwen.decode(ids)
        }
    } catch {
        guard (400..<500).contains(error.status) else { fatalError("a refusal with status \(error.status)") }
        mustBeJSON(error.body, "an error body")
    }
    return 0
}
