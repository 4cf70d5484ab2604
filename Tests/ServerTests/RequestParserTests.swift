import Foundation
import Engine
import Format
import OpenAICompatible
import Testing

/// Request bodies into generation requests, and generation pieces into the API's JSON.
@Suite struct RequestParserTests {
    static let model: ServedModel = {
        var defaults = SamplingParameters()
        defaults.temperature = 0.6
        defaults.topK = 20
        defaults.topP = 0.95
        return ServedModel(id: "example", contextLength: 512, vocabularySize: 1000, defaults: defaults, created: 1_700_000_000)
    }()

    func chat(_ json: String) throws(APIError) -> CompletionRequest {
        try RequestParser.chat(Array(json.utf8), model: Self.model) { 42 }
    }

    func completion(_ json: String) throws(APIError) -> CompletionRequest {
        try RequestParser.completion(Array(json.utf8), model: Self.model) { 42 }
    }

    func refusal(_ body: () throws(APIError) -> CompletionRequest) -> APIError? {
        do {
            _ = try body()
            return nil
        } catch {
            return error
        }
    }

    @Test func everyParameterReachesTheGenerationRequest() throws {
        let request = try chat(
            """
            {"model": "example", "messages": [{"role": "developer", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "there"}]},
              {"role": "assistant", "content": null}, {"role": "user", "content": "Again"}],
             "temperature": 0.3, "top_p": 0.5, "top_k": 7, "min_p": 0.1, "frequency_penalty": 0.5, "presence_penalty": -0.25,
             "repetition_penalty": 1.1, "seed": -1, "max_completion_tokens": 9, "stop": ["x", "yz"], "stream": true,
             "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 4, "logit_bias": {"5": -100, "7": 2.5},
             "user": "ignored", "ignore_eos": true}
            """)
        guard case .chat(let messages) = request.generation.prompt else { Issue.record("not a chat prompt"); return }
        #expect(
            messages == [
                ChatMessage(role: "system", content: "Be brief."), ChatMessage(role: "user", content: "Hello, there"),
                ChatMessage(role: "assistant", content: ""), ChatMessage(role: "user", content: "Again")
            ])
        let s = request.generation.sampling
        #expect(s.temperature == 0.3 && s.topP == 0.5 && s.topK == 7 && s.minP == Float(0.1))
        #expect(s.frequencyPenalty == 0.5 && s.presencePenalty == -0.25 && s.repetitionPenalty == Float(1.1))
        #expect(s.seed == UInt64.max && request.seed == UInt64.max)
        #expect(s.logitBias == [5: -100, 7: 2.5])
        #expect(request.generation.maximumTokens == 9)
        #expect(request.generation.stopStrings == ["x", "yz"])
        #expect(request.generation.ignoreEndOfSequence)
        #expect(request.generation.logprobs == 4 && request.logprobs)
        #expect(request.stream && request.includeUsage)
    }

    /// Left out: the package's sampling, a drawn seed, up to the whole context, no log-probabilities.
    @Test func omittedParametersTakeTheModelsDefaults() throws {
        let request = try chat(#"{"messages": [{"role": "user", "content": "Hi"}], "temperature": null}"#)
        var expected = Self.model.defaults
        expected.seed = 42
        #expect(request.generation.sampling == expected)
        #expect(request.generation.maximumTokens == Self.model.contextLength)
        #expect(request.generation.logprobs == nil && !request.stream && !request.includeUsage)
        #expect(try chat(#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100000}"#).generation.maximumTokens == 512)
    }

    @Test func completionPromptsInEveryAcceptedForm() throws {
        func prompt(_ json: String) throws -> GenerationRequest.Prompt { try completion(json).generation.prompt }
        guard case .text("Once") = try prompt(#"{"prompt": "Once"}"#) else { Issue.record("string"); return }
        guard case .text("Once") = try prompt(#"{"prompt": ["Once"]}"#) else { Issue.record("[string]"); return }
        guard case .tokens([1, 2, 3]) = try prompt(#"{"prompt": [1, 2, 3]}"#) else { Issue.record("[ids]"); return }
        guard case .tokens([4, 5]) = try prompt(#"{"prompt": [[4, 5]]}"#) else { Issue.record("[[ids]]"); return }
        #expect(try completion(#"{"prompt": "a", "logprobs": 3}"#).generation.logprobs == 3)
    }

    /// Each refusal names the field at fault.
    @Test func refusalsNameTheField() {
        let cases: [(String, String?, Bool)] = [
            (#"{"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}"#, "max_tokens", true),
            (#"{"messages": [{"role": "user", "content": "a"}], "top_k": 1.5}"#, "top_k", true),
            (#"{"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": true}}"#, "stream_options", true),
            (
                #"{"messages": [{"role": "user", "content": "a"}], "stream": true, "stream_options": {"include_usage": 1}}"#,
                "stream_options.include_usage", true
            ),
            (#"{"messages": [{"role": "user", "content": "a"}], "logit_bias": {"5": 500}}"#, "logit_bias.5", true),
            (#"{"messages": [{"role": "user", "content": "a"}], "logit_bias": {"1000": 1}}"#, "logit_bias", true),
            (#"{"messages": [{"role": "user", "content": "a"}], "temperature": 1e999}"#, "temperature", true),
            (#"{"messages": [{"role": "tool", "content": "a"}]}"#, "messages[0].role", true),
            (#"{"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}}"#, "response_format", true),
            (#"{"prompt": [1, 2, 1000]}"#, "prompt[2]", false),
            (#"{"prompt": [[1], [2]]}"#, "prompt", false),
            (#"{"prompt": "a", "best_of": 2}"#, "best_of", false),
            (#"{"prompt": "a", "logprobs": 21}"#, "logprobs", false)
        ]
        for (body, param, isChat) in cases {
            let error = refusal { () throws(APIError) in isChat ? try chat(body) : try completion(body) }
            #expect(error?.status == 400 && error?.param == param, "\(body): \(String(describing: error))")
        }
        let utf8 = refusal { () throws(APIError) in try RequestParser.chat([0x7B, 0xFF, 0x7D], model: Self.model) { 0 } }
        #expect(utf8?.code == "invalid_utf8")
        let deep = String(repeating: "[", count: 10_000)
        #expect(refusal { () throws(APIError) in try chat(deep) }?.code == "invalid_json")
    }

    @Test func errorsHaveOpenAIsShape() throws {
        let error = APIError.invalid("Bad.", param: "n", code: "x")
        #expect(error.body == #"{"error":{"message":"Bad.","type":"invalid_request_error","param":"n","code":"x"}}"#)
        #expect(APIError.invalid("Bad.").body == #"{"error":{"message":"Bad.","type":"invalid_request_error","param":null,"code":null}}"#)
    }

    func summary(_ reason: StopReason) -> GenerationSummary {
        GenerationSummary(
            reason: reason, promptTokens: 5, cachedTokens: 2, generatedTokens: 3, timeToFirstToken: 0.5, queuedSeconds: 0.1,
            decodeSeconds: 1)
    }

    /// A stream: the role first, a chunk per piece with text (or log-probabilities), the finish
    /// reason, then the usage when asked for.
    @Test func streamChunks() throws {
        var request = try chat(
            #"{"messages": [{"role": "user", "content": "a"}], "stream": true, "stream_options": {"include_usage": true}, "logprobs": true}"#
        )
        request.logprobs = true
        var responder = CompletionResponder(request: request, model: Self.model, id: "chatcmpl-1", created: 7) { Array("t\($0)".utf8) }
        let logprob = TokenLogprob(token: 3, logprob: -.infinity, alternatives: [])
        var chunks = responder.chunks(for: GenerationPiece(text: "He", token: 3, logprob: logprob, finish: nil))
        chunks += responder.chunks(for: GenerationPiece(text: "", token: 4, logprob: nil, finish: nil))
        chunks += responder.chunks(for: GenerationPiece(text: "llo", token: nil, logprob: nil, finish: summary(.maximumTokens)))
        let parsed = try chunks.map { try JSONParser.parse($0).objectValue! }
        #expect(parsed.count == 5)
        func choice(_ i: Int) -> JSONObject { parsed[i]["choices"]!.arrayValue![0].objectValue! }
        #expect(choice(0)["delta"] == .object(JSONObject([("role", .string("assistant")), ("content", .string(""))])))
        #expect(choice(1)["delta"]!.objectValue!["content"] == .string("He"))
        let entry = choice(1)["logprobs"]!.objectValue!["content"]!.arrayValue![0].objectValue!
        #expect(entry["token"] == .string("t3") && entry["logprob"]?.doubleValue == -9999)
        #expect(choice(2)["delta"]!.objectValue!["content"] == .string("llo"))
        #expect(choice(3)["finish_reason"] == .string("length") && choice(3)["delta"] == .object(JSONObject()))
        #expect(parsed[4]["choices"] == .array([]))
        let usage = parsed[4]["usage"]!.objectValue!
        #expect(usage["prompt_tokens"]?.intValue == 5 && usage["completion_tokens"]?.intValue == 3 && usage["total_tokens"]?.intValue == 8)
        #expect(usage["prompt_tokens_details"]?.objectValue?["cached_tokens"]?.intValue == 2)
        #expect(parsed.allSatisfy { $0["id"] == .string("chatcmpl-1") && $0["object"] == .string("chat.completion.chunk") })
        #expect(responder.text == "Hello")
    }

    @Test func wholeCompletion() throws {
        let request = try completion(#"{"prompt": "a", "logprobs": 1}"#)
        var responder = CompletionResponder(request: request, model: Self.model, id: "cmpl-1", created: 7) { Array("t\($0)".utf8) }
        let alternatives = [TokenLogprob.Alternative(token: 9, logprob: -0.1)]
        responder.add(GenerationPiece(text: "x", token: 3, logprob: TokenLogprob(token: 3, logprob: -2, alternatives: alternatives)))
        responder.add(GenerationPiece(text: "", token: 4, logprob: nil))
        let object = try JSONParser.parse(responder.response(summary(.stopString))).objectValue!
        let choice = object["choices"]!.arrayValue![0].objectValue!
        #expect(object["object"] == .string("text_completion") && choice["text"] == .string("x"))
        #expect(choice["finish_reason"] == .string("stop"))
        let logprobs = choice["logprobs"]!.objectValue!
        #expect(logprobs["tokens"] == .array([.string("t3")]) && logprobs["text_offset"] == .array([.int(0)]))
        #expect(logprobs["top_logprobs"] == .array([.object(JSONObject([("t9", .double(-0.1))]))]))
    }

    /// Log-probabilities from logits: a log-softmax, the best ids first.
    @Test func tokenLogprobs() {
        let logits: [Float] = [1, 3, 2, 3, -.infinity]
        let result = logits.withUnsafeBufferPointer { TokenLogprob.compute($0, token: 2, top: 3) }
        let total = logits.reduce(0.0) { $0 + exp(Double($1)) }
        #expect(abs(Double(result.logprob) - (2 - log(total))) < 1e-5)
        #expect(result.alternatives.map(\.token) == [1, 3, 2])
        #expect(result.alternatives[0].logprob == result.alternatives[1].logprob)
    }
}
