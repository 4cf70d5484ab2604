import Foundation
import Format
import Synchronization

/// What to generate: a prompt, how to sample, and when to stop.
public struct GenerationRequest: Sendable {
    public enum Prompt: Sendable {
        /// Text encoded as it is (text that spells a special token becomes that token).
        case text(String)
        /// Messages rendered through the chat template, ending with the assistant's opening.
        case chat([ChatMessage])
        /// Token ids.
        case tokens([Int])
    }

    public var prompt: Prompt
    public var sampling: SamplingParameters
    /// Tokens to generate at most (at least 1).
    public var maximumTokens: Int
    /// Generation ends at the first of these; the text stops before it.
    public var stopStrings: [String]
    /// Go on past the model's end-of-sequence tokens (and `<|im_end|>`, `<|endoftext|>`), as
    /// llama.cpp's `ignore_eos`: for benchmarks that need a fixed length.
    public var ignoreEndOfSequence: Bool
    /// With each generated token, its log-probability and this many most likely alternatives
    /// (nil: none). At most `TokenLogprob.maximumAlternatives`.
    public var logprobs: Int?

    public init(
        prompt: Prompt, sampling: SamplingParameters = SamplingParameters(), maximumTokens: Int = 256, stopStrings: [String] = [],
        ignoreEndOfSequence: Bool = false, logprobs: Int? = nil
    ) {
        self.prompt = prompt
        self.sampling = sampling
        self.maximumTokens = maximumTokens
        self.stopStrings = stopStrings
        self.ignoreEndOfSequence = ignoreEndOfSequence
        self.logprobs = logprobs
    }
}

/// A generated token's log-probability under the model (the log-softmax of its logits, before
/// penalties, temperature and truncation), with the most likely ids at that position.
public struct TokenLogprob: Sendable, Equatable {
    public static let maximumAlternatives = 20

    public struct Alternative: Sendable, Equatable {
        public var token: Int
        public var logprob: Float
        public init(token: Int, logprob: Float) {
            self.token = token
            self.logprob = logprob
        }
    }

    public var token: Int
    public var logprob: Float
    /// The most likely ids, most likely first (ties: lower id first).
    public var alternatives: [Alternative]

    public init(token: Int, logprob: Float, alternatives: [Alternative]) {
        self.token = token
        self.logprob = logprob
        self.alternatives = alternatives
    }

    /// `token`'s log-probability in `logits`, with the `top` most likely ids.
    public static func compute(_ logits: UnsafeBufferPointer<Float>, token: Int, top: Int) -> TokenLogprob {
        let logSum = LogitComparison.logSumExp(logits)
        func logprob(_ id: Int) -> Float { Float(Double(logits[id]) - logSum) }
        let count = min(max(0, top), maximumAlternatives, logits.count)
        let alternatives = firstInOrder(count, of: logits.count) { a, b in logits[a] > logits[b] || (logits[a] == logits[b] && a < b) }
        return TokenLogprob(
            token: token, logprob: logprob(token), alternatives: alternatives.map { Alternative(token: $0, logprob: logprob($0)) })
    }
}

/// A piece of a generation, as its stream delivers it: one per generated token, then a last
/// one that carries `finish`.
public struct GenerationPiece: Sendable {
    /// Text that became final with this piece (often empty: a token may end inside a character,
    /// or begin what could be a stop string).
    public var text: String
    /// The token generated with this piece (none in the last piece).
    public var token: Int?
    /// The token's log-probability, when the request asked for them.
    public var logprob: TokenLogprob?
    /// Set on the last piece only.
    public var finish: GenerationSummary?

    public init(text: String, token: Int?, logprob: TokenLogprob? = nil, finish: GenerationSummary? = nil) {
        self.text = text
        self.token = token
        self.logprob = logprob
        self.finish = finish
    }
}

/// How a generation ended, with its counts and timings.
public struct GenerationSummary: Sendable {
    public var reason: StopReason
    public var promptTokens: Int
    /// Prompt tokens a sequence already held from an earlier generation (the prompt cache), so
    /// not evaluated again.
    public var cachedTokens: Int
    /// Generated tokens, the stop token included when one ended the generation.
    public var generatedTokens: Int
    /// Seconds from the request to its first token (waiting for a free sequence included).
    public var timeToFirstToken: Double
    /// Seconds the request waited for a free sequence.
    public var queuedSeconds: Double
    /// Seconds from the first token to the last.
    public var decodeSeconds: Double

    public init(
        reason: StopReason, promptTokens: Int, cachedTokens: Int, generatedTokens: Int, timeToFirstToken: Double, queuedSeconds: Double,
        decodeSeconds: Double
    ) {
        self.reason = reason
        self.promptTokens = promptTokens
        self.cachedTokens = cachedTokens
        self.generatedTokens = generatedTokens
        self.timeToFirstToken = timeToFirstToken
        self.queuedSeconds = queuedSeconds
        self.decodeSeconds = decodeSeconds
    }
}

/// Runs many generations at once on one model: each forward step evaluates the next token of
/// every generation that is decoding and a chunk of the prompt of one that has just started
/// (chunked prefill), so a dense matrix is read once for all of them and a chosen expert once
/// for every token that chose it. Generations join and leave between steps.
///
/// ```swift
/// let model = try Model(path: "model.stpk")
/// let generator = try BatchGenerator(model: model, tokenizer: Tokenizer(package: model.package), parallel: 4)
/// let request = GenerationRequest(prompt: .chat([ChatMessage(role: "user", content: "Hello")]), maximumTokens: 64)
/// for try await piece in generator.generate(request) { print(piece.text, terminator: "") }
/// ```
///
/// Each `generate` returns its own stream; start as many as you like from any tasks. Up to
/// `parallel` run at once and the others wait their turn. Cancelling the task that consumes a
/// stream (or dropping the stream) ends that generation at the next step and frees its
/// sequence. The generator owns a thread that runs the steps; `shutdown` (or releasing the
/// generator) stops it.
///
/// A finished generation leaves its tokens in its sequence's cache. A new generation takes the
/// free sequence that holds the longest beginning of its prompt and evaluates only the rest (the
/// next turn of a chat, a shared system prompt); `promptCache: false` turns that off.
public final class BatchGenerator: Sendable {
    /// Generations running at once at most (the session's sequences).
    public let parallel: Int
    /// Positions each generation can hold, prompt included.
    public let contextLength: Int
    public let tokenizer: Tokenizer
    public let model: Model
    private let scheduler: Scheduler

    /// Counts since the generator started, and what is running now.
    public struct Statistics: Sendable {
        /// Generations on a sequence now.
        public var running = 0
        /// Generations waiting for a sequence.
        public var waiting = 0
        /// Finished generations (cancelled and failed ones included).
        public var finished = 0
        public var promptTokens = 0
        /// Prompt tokens taken from the prompt cache (included in `promptTokens`).
        public var cachedPromptTokens = 0
        public var generatedTokens = 0
        /// Forward steps run, and seconds spent in them.
        public var steps = 0
        public var stepSeconds = 0.0

        public init() {}
    }

    /// Generations share `session` (created with `sequences: parallel`): from now on only the
    /// generator's thread uses it.
    /// - Parameter maximumWaiting: generations that may wait for a sequence; past that a new
    ///   one fails at once with `EngineError.queueFull`.
    public init(session: Session, tokenizer: Tokenizer, maximumWaiting: Int = .max, promptCache: Bool = true) {
        parallel = session.sequenceCount
        contextLength = session.contextLength
        self.tokenizer = tokenizer
        model = session.model
        scheduler = Scheduler(session: session, tokenizer: tokenizer, maximumWaiting: max(0, maximumWaiting), promptCache: promptCache)
    }

    /// A generator of `parallel` sequences of `contextLength` positions each (nil: the model's
    /// default); the other parameters are `Session`'s.
    public convenience init(
        model: Model, tokenizer: Tokenizer, parallel: Int, contextLength: Int? = nil, threads: Int = Session.defaultThreads,
        memoryBudget: Int? = nil, kernels: DotKernels.InstructionSet? = nil, maximumWaiting: Int = .max, promptCache: Bool = true,
        kvType: KVCacheType = .default
    ) throws(EngineError) {
        let session = try Session(
            model: model, contextLength: contextLength, threads: threads, memoryBudget: memoryBudget, kernels: kernels,
            sequences: parallel, kvType: kvType)
        self.init(session: session, tokenizer: tokenizer, maximumWaiting: maximumWaiting, promptCache: promptCache)
    }

    deinit { scheduler.stop(gracePeriod: 0) }

    /// Starts a generation. The stream yields a piece per generated token and a last piece with
    /// the summary, or throws an `EngineError` (a prompt that does not fit the context, a full
    /// queue, a shut-down generator).
    public func generate(_ request: GenerationRequest) -> AsyncThrowingStream<GenerationPiece, any Error> {
        let (stream, continuation) = AsyncThrowingStream<GenerationPiece, any Error>.makeStream()
        do {
            let job = try Job(request: request, tokenizer: tokenizer, model: model, context: contextLength, continuation: continuation)
            let scheduler = self.scheduler, id = job.id
            continuation.onTermination = { [weak scheduler] termination in
                if case .cancelled = termination { scheduler?.cancel(id) }
            }
            try scheduler.submit(job)
        } catch {
            continuation.finish(throwing: error)
        }
        return stream
    }

    /// The tokens a request's prompt evaluates to.
    public func promptTokens(_ prompt: GenerationRequest.Prompt) -> [Int] {
        Job.tokens(of: prompt, tokenizer: tokenizer)
    }

    public var statistics: Statistics { scheduler.statistics }

    /// The session's expert cache, when it streams experts under a memory budget (read its
    /// statistics; do not change it while generations run).
    public var expertCache: ExpertCache? { scheduler.session.expertCache }

    /// Stops the generator: new generations fail with `EngineError.shutDown`, so do waiting
    /// ones; running ones run to their end when `finishRunning`, else end with that error at the
    /// next step. Returns when the generator's thread has stopped.
    public func shutdown(finishRunning: Bool = false) { scheduler.stop(gracePeriod: finishRunning ? .infinity : 0) }

    /// Stops the generator as `shutdown(finishRunning: true)` does, but ends generations still
    /// running `gracePeriod` seconds from now with `EngineError.shutDown`.
    public func shutdown(gracePeriod: Double) { scheduler.stop(gracePeriod: gracePeriod) }
}

/// One generation: its request, its stream, and, once it has a sequence, its progress.
/// Everything but `id` and `continuation` belongs to the scheduler's thread.
private final class Job: @unchecked Sendable {
    static let lastID = Atomic<Int>(0)

    let id: Int
    let prompt: [Int]
    let maximumTokens: Int
    let ignoreEndOfSequence: Bool
    let logprobs: Int?
    let continuation: AsyncThrowingStream<GenerationPiece, any Error>.Continuation
    let submitted = ProgressReporter.monotonicSeconds()
    var admitted = 0.0
    var firstToken: Double?
    var sequence = -1
    /// Prompt tokens evaluated so far (or held by the sequence from before).
    var fed = 0
    /// Prompt tokens the sequence held from before.
    var cached = 0
    var sampler: Sampler
    /// Prompt and generated ids (the repetition penalty's history).
    var history: [Int]
    var generated = 0
    /// The last sampled id, evaluated in the next step.
    var next: Int?
    var text: TextAssembler

    init(
        request: GenerationRequest, tokenizer: Tokenizer, model: Model, context: Int,
        continuation: AsyncThrowingStream<GenerationPiece, any Error>.Continuation
    ) throws(EngineError) {
        prompt = Job.tokens(of: request.prompt, tokenizer: tokenizer)
        guard !prompt.isEmpty else { throw .emptyInput }
        let vocab = model.config.vocabSize
        if let bad = prompt.first(where: { !(0..<vocab).contains($0) }) { throw .invalidToken(id: bad, vocabularySize: vocab) }
        // The prompt must leave room for at least one generated token (as `TokenGenerator`).
        guard prompt.count < context else { throw .inputTooLong(tokens: prompt.count, context: context) }
        guard request.maximumTokens >= 1 else { throw .emptyInput }
        maximumTokens = request.maximumTokens
        ignoreEndOfSequence = request.ignoreEndOfSequence
        logprobs = request.logprobs.map { min(max(0, $0), TokenLogprob.maximumAlternatives) }
        self.continuation = continuation
        sampler = Sampler(request.sampling)
        history = prompt
        text = TextAssembler(tokenizer: tokenizer, stopStrings: request.stopStrings)
        id = Job.lastID.add(1, ordering: .relaxed).newValue
    }

    static func tokens(of prompt: GenerationRequest.Prompt, tokenizer: Tokenizer) -> [Int] {
        switch prompt {
        case .text(let text): tokenizer.encode(text)
        case .chat(let messages): tokenizer.encode(ChatTemplate.render(messages))
        case .tokens(let ids): ids
        }
    }

    var decoding: Bool { next != nil }
}

/// The generator's thread and what it shares with the callers: a queue of waiting jobs,
/// cancellations, and the statistics, under one condition lock.
private final class Scheduler: @unchecked Sendable {
    let session: Session
    let tokenizer: Tokenizer
    let maximumWaiting: Int
    let promptCache: Bool
    private let stopTokens: Set<Int>
    private let speakable: Int

    // Shared, under `condition`.
    private let condition = NSCondition()
    private var waiting: [Job] = []
    private var cancelled: Set<Int> = []
    private var stopping = false
    /// When stopping: the monotonic time past which running jobs are cut.
    private var stopDeadline = 0.0
    private var stopped = false
    private var shared = BatchGenerator.Statistics()

    // The scheduler thread's own.
    private var running: [Job] = []  // in order of admission
    /// Free sequences, the longest free first.
    private var freeSequences: [Int]
    /// The ids whose keys and values each sequence holds (the prompt cache).
    private var held: [[Int]]
    private let logits: UnsafeMutableBufferPointer<Float>  // (sequences, vocab)

    init(session: Session, tokenizer: Tokenizer, maximumWaiting: Int, promptCache: Bool) {
        self.session = session
        self.tokenizer = tokenizer
        self.maximumWaiting = maximumWaiting
        self.promptCache = promptCache
        stopTokens = TextGenerator.stopTokens(session.model, tokenizer)
        speakable = min(tokenizer.vocabularySize, session.model.config.vocabSize)
        freeSequences = Array(0..<session.sequenceCount)
        held = Array(repeating: [], count: session.sequenceCount)
        logits = .allocate(capacity: session.sequenceCount * session.model.config.vocabSize)
        let thread = Thread { [self] in loop() }
        thread.name = "strun scheduler"
        thread.stackSize = 8 << 20
        thread.start()
    }

    deinit { logits.deallocate() }

    func submit(_ job: Job) throws(EngineError) {
        condition.lock()
        defer { condition.unlock() }
        guard !stopping else { throw .shutDown }
        // Jobs beyond the free sequences wait; `maximumWaiting` bounds those.
        let beyond = waiting.count - max(0, session.sequenceCount - shared.running)
        guard beyond < maximumWaiting else { throw .queueFull(waiting: beyond) }
        waiting.append(job)
        shared.waiting = waiting.count
        condition.signal()
    }

    func cancel(_ id: Int) {
        condition.lock()
        defer { condition.unlock() }
        if let i = waiting.firstIndex(where: { $0.id == id }) {
            waiting.remove(at: i)
            shared.waiting = waiting.count
            shared.finished += 1
        } else {
            cancelled.insert(id)
            condition.signal()
        }
    }

    var statistics: BatchGenerator.Statistics {
        condition.lock()
        defer { condition.unlock() }
        return shared
    }

    func stop(gracePeriod: Double) {
        condition.lock()
        if !stopping {
            stopping = true
            stopDeadline = ProgressReporter.monotonicSeconds() + max(0, gracePeriod)
            let refused = waiting
            waiting.removeAll()
            shared.waiting = 0
            shared.finished += refused.count
            for job in refused { job.continuation.finish(throwing: EngineError.shutDown) }
        }
        condition.signal()
        while !stopped { condition.wait() }
        condition.unlock()
    }

    // MARK: The scheduler's thread

    private func loop() {
        while true {
            condition.lock()
            while !stopping && cancelled.isEmpty && running.isEmpty && waiting.isEmpty { condition.wait() }
            let cancellations = cancelled
            cancelled.removeAll()
            var admitted: [Job] = []
            while admitted.count < freeSequences.count && !waiting.isEmpty { admitted.append(waiting.removeFirst()) }
            let stopNow =
                stopping && (running.isEmpty && admitted.isEmpty || ProgressReporter.monotonicSeconds() >= stopDeadline)
            shared.waiting = waiting.count
            shared.running = running.count + admitted.count
            condition.unlock()

            for job in running where cancellations.contains(job.id) { release(job, outcome: nil) }
            let now = ProgressReporter.monotonicSeconds()
            var cachedTokens = 0
            for job in admitted {
                job.admitted = now
                assign(job)
                cachedTokens += job.cached
                running.append(job)
            }
            if cachedTokens > 0 {
                condition.lock()
                shared.promptTokens += cachedTokens
                shared.cachedPromptTokens += cachedTokens
                condition.unlock()
            }
            if stopNow {
                for job in running { release(job, outcome: .failure(.shutDown)) }
                condition.lock()
                stopped = true
                condition.broadcast()
                condition.unlock()
                return
            }
            if !running.isEmpty { step() }
        }
    }

    /// Gives `job` the free sequence holding the longest beginning of its prompt, keeping that
    /// beginning (at least the last prompt token is evaluated, for its logits); without one, the
    /// free sequence free the longest, preferring an empty one.
    private func assign(_ job: Job) {
        func common(_ a: [Int], _ b: [Int]) -> Int {
            var n = 0
            while n < a.count && n < b.count && a[n] == b[n] { n += 1 }
            return n
        }
        var choice = freeSequences.firstIndex { held[$0].isEmpty } ?? 0
        var keep = 0
        if promptCache {
            for (i, sequence) in freeSequences.enumerated() {
                let n = min(common(held[sequence], job.prompt), job.prompt.count - 1)
                if n > keep { (choice, keep) = (i, n) }
            }
        }
        let sequence = freeSequences.remove(at: choice)
        job.sequence = sequence
        if keep > 0 && session.truncate(sequence: sequence, to: keep) {
            held[sequence].removeSubrange(keep...)
        } else {
            keep = 0
            session.reset(sequence: sequence)
            held[sequence].removeAll()
        }
        job.fed = keep
        job.cached = keep
    }

    /// One forward step: every decoding job's next token, then prompt chunks in order of
    /// admission to fill the batch; then a token sampled for every job the step gave logits.
    private func step() {
        var chunks: [SequenceChunk] = []
        var owners: [(job: Job, prompt: Int)] = []  // per chunk: its job and how many prompt tokens it feeds
        var room = Session.maximumBatch
        for job in running where job.decoding {
            chunks.append(SequenceChunk(sequence: job.sequence, tokens: [job.next!], logits: .last))
            owners.append((job, 0))
            room -= 1
        }
        for job in running where !job.decoding && room > 0 {
            let take = min(room, job.prompt.count - job.fed)
            let completes = job.fed + take == job.prompt.count
            chunks.append(
                SequenceChunk(
                    sequence: job.sequence, tokens: Array(job.prompt[job.fed..<job.fed + take]), logits: completes ? .last : .none))
            owners.append((job, take))
            room -= take
        }
        let start = ProgressReporter.monotonicSeconds()
        do {
            try session.evaluate(chunks, into: logits)
        } catch {
            // An expert that cannot be read, say: every job of the step ends with the error.
            for (job, _) in owners { release(job, outcome: .failure(error)) }
            return
        }
        for chunk in chunks { held[chunk.sequence] += chunk.tokens }
        let end = ProgressReporter.monotonicSeconds()
        // The counts go in before any stream hears of this step, so a consumer that has seen its
        // generation end sees it counted.
        condition.lock()
        shared.steps += 1
        shared.stepSeconds += end - start
        for (chunk, (_, fed)) in zip(chunks, owners) {
            shared.promptTokens += fed
            if chunk.logits == .last { shared.generatedTokens += 1 }
        }
        condition.unlock()
        var row = 0
        let vocab = session.model.config.vocabSize
        for (chunk, (job, fed)) in zip(chunks, owners) {
            job.fed += fed
            guard chunk.logits == .last else { continue }
            let scores = UnsafeMutableBufferPointer(rebasing: logits[row * vocab..<(row + 1) * vocab])
            row += 1
            sample(job, scores, at: end)
        }
    }

    /// Samples `job`'s next token from `scores` and passes it on; ends the job where
    /// `TokenGenerator` would end it.
    private func sample(_ job: Job, _ scores: UnsafeMutableBufferPointer<Float>, at now: Double) {
        for i in speakable..<scores.count { scores[i] = -.infinity }
        let token = job.sampler.sample(UnsafeBufferPointer(scores), history: job.history, generated: job.generated)
        job.generated += 1
        job.history.append(token)
        job.next = nil
        if job.firstToken == nil { job.firstToken = now }
        if stopTokens.contains(token) && !job.ignoreEndOfSequence {
            // The stop token is not part of the text; OpenAI gives no log-probability for it.
            job.continuation.yield(GenerationPiece(text: "", token: token, logprob: nil, finish: nil))
            return release(job, outcome: .success(.endOfSequence))
        }
        let logprob = job.logprobs.map { TokenLogprob.compute(UnsafeBufferPointer(scores), token: token, top: $0) }
        let piece: (text: String, stopped: Bool)
        do {
            piece = try job.text.add(token)
        } catch {
            return release(job, outcome: .failure(error))
        }
        job.continuation.yield(GenerationPiece(text: piece.text, token: token, logprob: logprob, finish: nil))
        if piece.stopped { return release(job, outcome: .success(.stopString)) }
        if job.generated == job.maximumTokens { return release(job, outcome: .success(.maximumTokens)) }
        if session.position(of: job.sequence) >= session.contextLength { return release(job, outcome: .success(.contextFull)) }
        job.next = token
    }

    /// Ends `job` (nil: it was cancelled, its stream is gone) and frees its sequence, counting it
    /// before its stream ends. The sequence keeps what it holds for the prompt cache, unless the
    /// job failed.
    private func release(_ job: Job, outcome: Result<StopReason, EngineError>?) {
        running.removeAll { $0 === job }
        freeSequences.append(job.sequence)
        if case .failure = outcome {
            session.reset(sequence: job.sequence)
            held[job.sequence].removeAll()
        }
        condition.lock()
        shared.running = running.count
        shared.finished += 1
        condition.unlock()
        switch outcome {
        case .success(let reason):
            let rest = reason == .stopString ? "" : job.text.finish()
            let now = ProgressReporter.monotonicSeconds()
            let first = job.firstToken ?? now
            job.continuation.yield(
                GenerationPiece(
                    text: rest, token: nil,
                    finish: GenerationSummary(
                        reason: reason, promptTokens: job.prompt.count, cachedTokens: job.cached, generatedTokens: job.generated,
                        timeToFirstToken: first - job.submitted, queuedSeconds: job.admitted - job.submitted,
                        decodeSeconds: now - first)))
            job.continuation.finish()
        case .failure(let error):
            job.continuation.finish(throwing: error)
        case nil:
            break
        }
    }
}
