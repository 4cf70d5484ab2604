import CKernels

/// One expert's matrices, all neuron-major [ffn, hidden]: row j of each belongs to neuron j. How
/// a token, and a batch of tokens, go through it is chosen here, once, from the types and
/// layouts (`tokenPath`, `batchPath`).
struct ExpertWeights: @unchecked Sendable {
    let gate: WeightMatrix
    let up: WeightMatrix
    let down: WeightMatrix
    let tokenPath: TokenPath
    let batchPath: BatchPath

    /// How one token goes through the expert.
    enum TokenPath {
        /// Q4_0 gate in row groups (`row_major_x8`), up in row or block groups, Q4_0 down: one C
        /// call per slice of neurons (`fusedReGLU`), and decoding hands the slices to whichever
        /// worker is free (`Session.decodeSlices`).
        case groupedQ4_0
        /// Gate and up grouped as above, down of another type (a `--tensor-type` override).
        case groupedOtherDown
        /// Q4_0 gate, up and down in plain rows: one C call per slice of neurons.
        case rowsQ4_0
        /// Anything else (float or Q8_0 matrices, mixed types and layouts): three passes.
        case generic
    }

    /// How the tokens of a batch that chose the expert go through it.
    enum BatchPath {
        /// Grouped gate and up rows against all the tokens at once, eight neurons at a time.
        case grouped
        /// Quantised gate and up in plain rows: each gate row against all the tokens at once.
        case quantizedRows
        /// One token after another, by the token path.
        case tokenByToken
    }

    init(gate: WeightMatrix, up: WeightMatrix, down: WeightMatrix) {
        self.gate = gate
        self.up = up
        self.down = down
        let grouped = gate.layout == .rowMajorX8 && (up.layout == .rowMajorX8 || up.layout == .rowMajorB8)
        if grouped {
            tokenPath = down.dtype == .q4_0 ? .groupedQ4_0 : .groupedOtherDown
            batchPath = .grouped
        } else {
            let plain = gate.layout == .rowMajor && up.layout == .rowMajor
            tokenPath = plain && gate.dtype == .q4_0 && up.dtype == .q4_0 && down.dtype == .q4_0 ? .rowsQ4_0 : .generic
            batchPath = plain && gate.dtype.isQuantized ? .quantizedRows : .tokenByToken
        }
    }

    /// Neurons in whole groups of eight when gate or up rows are grouped.
    var neuronUnit: Int { gate.layout == .rowMajorX8 || up.layout == .rowMajorX8 ? 8 : 1 }
}

extension Session {
    /// x += Σ_e weight_e · down_e(relu(gate_e · h) ⊙ (up_e · h)), h = rmsnorm(x), over each token's
    /// chosen experts e.
    func mixExperts(layer: LayerWeights, index: Int, count n: Int) throws(EngineError) {
        let c = model.config, hidden = c.hiddenSize
        let input = expertInput(layer: layer, index: index, count: n)
        // Recording activations: each expert's tokens get rows of `activationRows` from
        // `assignments.firstRow`, zero where the ReLU stops a neuron.
        let recording = expertActivationHook != nil
        if recording { activationRows!.update(repeating: 0, count: n * c.activeExperts * c.expertFFNSize) }
        // Each worker adds into its own buffer; the buffers are summed in worker order.
        let workers = max(1, min(threads, c.expertFFNSize))
        for worker in 0..<workers { (partials + worker * Session.maximumBatch * hidden).update(repeating: 0, count: n * hidden) }
        // With a cache, a batch that chose more experts than it has slots runs in groups that fit.
        let chosen = UnsafeBufferPointer(start: assignments.used, count: assignments.usedCount)
        let groupSize = expertCache.map { max(1, min($0.slotCount, chosen.count)) } ?? max(1, chosen.count)
        for groupStart in stride(from: 0, to: chosen.count, by: groupSize) {
            let group = UnsafeBufferPointer(rebasing: chosen[groupStart..<min(groupStart + groupSize, chosen.count)])
            for e in 0..<c.expertCount { currentExperts[e] = nil }
            // The paths the experts take: as stored when streamed, else as loaded.
            let loaded = expertCache == nil ? layer.experts : model.mappedExperts[index]
            if n <= Session.decodeTokens, workers > 1, !recording, let tokens = input.quantized,
                group.allSatisfy({ loaded[$0].tokenPath == .groupedQ4_0 })
            {
                try decode(group, layer: layer, index: index, tokens: tokens, workers: workers)
            } else {
                for e in group { currentExperts[e] = try expertWeights(layer: layer, index: index, expert: e) }
                let work = ExpertWork(session: self, input: input)
                parallelForOnThisTier(workers) { worker in
                    for e in 0..<work.routing.experts where work.routing.counts[e] > 0 {
                        if let expert = work.experts[e] { work.run(expert, e, worker: worker, of: workers) }
                    }
                }
            }
            if let hook = expertActivationHook {
                for e in group {
                    hook(
                        index, e, UnsafeBufferPointer(start: assignments.tokens + e * Session.maximumBatch, count: assignments.counts[e]),
                        UnsafeBufferPointer(
                            start: activationRows! + assignments.firstRow[e] * c.expertFFNSize,
                            count: assignments.counts[e] * c.expertFFNSize))
                }
            }
            expertCache?.release(layer: index, experts: group)
        }
        mixture.update(from: partials, count: n * hidden)
        st_add_rows(
            mixture, partials + Session.maximumBatch * hidden, Int32(workers - 1), Int32(Session.maximumBatch * hidden), Int32(n * hidden))
        st_add_rows(residual.floats, mixture, 1, 0, Int32(n * hidden))
        residual.setCount(n)
    }

    /// The experts' input h = rmsnorm(x) for the batch, its Q8_0 form when an expert reads one,
    /// and, in a batch, each expert's tokens gathered side by side (so that one gate row serves
    /// all of them through the many-token kernels, unpacked once).
    private func expertInput(layer: LayerWeights, index: Int, count n: Int) -> ExpertWork.Input {
        normed.setCount(n)
        for t in 0..<n { rmsNorm(residual.row(t), layer.ffnNorm, into: normed.row(t)) }
        expertInputHook?(index, rows, UnsafeBufferPointer(start: normed.floats, count: n * model.config.hiddenSize))
        guard layer.experts.contains(where: { $0.gate.dtype.isQuantized || $0.up.dtype.isQuantized }) else {
            return ExpertWork.Input(floats: normed.floats, quantized: nil, gathered: nil)
        }
        let quantized = normed.quantizedForm()
        guard n > 1 else { return ExpertWork.Input(floats: normed.floats, quantized: quantized, gathered: nil) }
        expertInputs.setCount(0)
        // In expert order, so expert e's tokens start at row `assignments.firstRow[e]` (set by `route`).
        for e in 0..<model.config.expertCount {
            for i in 0..<assignments.counts[e] { expertInputs.append(row: assignments.tokens[e * Session.maximumBatch + i], of: normed) }
        }
        return ExpertWork.Input(floats: normed.floats, quantized: quantized, gathered: expertInputs.quantizedForm())
    }

    /// Decoding: each token of a step of at most `decodeTokens` (one per sequence) through its
    /// experts in `group` (all `.groupedQ4_0`), one (expert, token) pair at a time with the
    /// one-token kernel, expert by expert, so the tokens that share an expert read it from the
    /// cache one after another. When streaming, the experts already in memory are computed while
    /// the reads of the others finish. Each slice of a pair has its own sum and each token's are
    /// added in the same order whatever ran first, so the result is the unbudgeted one bit for bit
    /// (and one token gets what it gets decoding alone).
    private func decode(
        _ group: UnsafeBufferPointer<Int>, layer: LayerWeights, index: Int, tokens: QuantizedActivations, workers: Int
    ) throws(EngineError) {
        let b = Session.maximumBatch
        decodePairCount = 0
        for e in group {
            for i in 0..<assignments.counts[e] {
                decodePairs[decodePairCount] = ExpertPair(
                    expert: e, token: assignments.tokens[e * b + i], weight: assignments.weights[e * b + i])
                decodePairCount += 1
            }
        }
        let pairs = UnsafeBufferPointer(start: decodePairs, count: decodePairCount)
        let resident = expertCache.map { cache in group.map { cache.isReady(layer: index, expert: $0) } } ?? group.map { _ in true }
        var isResident = [Bool](repeating: false, count: model.config.expertCount)
        for (i, e) in group.enumerated() { isResident[e] = resident[i] }
        for phase in [true, false] where resident.contains(phase) {
            for (i, e) in group.enumerated() where resident[i] == phase {
                currentExperts[e] = try expertWeights(layer: layer, index: index, expert: e)
            }
            decodeSlices(pairs, computing: pairs.map { isResident[$0.expert] == phase }, tokens: tokens, workers: workers)
        }
        let hidden = model.config.hiddenSize, slices = Session.decodeSlices
        for (p, pair) in pairs.enumerated() {
            st_add_rows(partials + pair.token * hidden, sliceSums + p * slices * hidden, Int32(slices), Int32(hidden), Int32(hidden))
        }
    }

    /// The (expert, token) pairs `pairs` in slices of a quarter of an expert's neurons,
    /// taken by whichever worker is free: the two cores rarely run at the same speed on a shared
    /// machine (the memory traffic of one slows the other), and a static half each left one
    /// waiting. Computes the slices of the pairs where `computing` is true, each into its own
    /// buffer of `sliceSums` (slice s of pair p at (p · decodeSlices + s) · hidden); the caller
    /// adds them in order.
    func decodeSlices(_ pairs: UnsafeBufferPointer<ExpertPair>, computing: [Bool], tokens x: QuantizedActivations, workers: Int) {
        let c = model.config
        let hidden = c.hiddenSize, ffn = c.expertFFNSize, perPair = Session.decodeSlices
        // Slice by slice within an expert, each slice for all the expert's tokens in turn: the
        // second token reads the slice's rows from the cache the first left them in.
        var todo: [Int] = []
        var first = 0
        while first < pairs.count {
            var end = first + 1
            while end < pairs.count && pairs[end].expert == pairs[first].expert { end += 1 }
            for part in 0..<perPair {
                for p in first..<end where computing[p] { todo.append(p * perPair + part) }
            }
            first = end
        }
        nextSlice.store(0, ordering: .relaxed)
        // Part p of an expert: its neurons in whole groups of eight.
        func neurons(_ part: Int) -> Range<Int> { 8 * (ffn / 8 * part / perPair)..<8 * (ffn / 8 * (part + 1) / perPair) }
        let work = Unchecked((self, pairs, todo))
        parallelForOnThisTier(workers) { worker in
            let (session, pairs, todo) = work.value
            let scratch = session.gateBuffers + worker * Session.gateBufferStride(ffn: ffn)
            // Each worker claims its next slice before adding the current one's down rows, and
            // fetches that slice's gate rows meanwhile (the down stage is arithmetic-bound); the
            // last two slices are left to whoever is free first.
            var slice = session.nextSlice.add(1, ordering: .relaxed).oldValue
            while slice < todo.count {
                var following = todo.count
                if session.nextSlice.load(ordering: .relaxed) + 2 <= todo.count {
                    following = session.nextSlice.add(1, ordering: .relaxed).oldValue
                }
                let pair = pairs[todo[slice] / perPair]
                let out = session.sliceSums + todo[slice] * hidden
                out.update(repeating: 0, count: hidden)
                var next: UnsafeRawBufferPointer? = nil
                if following < todo.count {
                    let gate = session.currentExperts[pairs[todo[following] / perPair].expert]!.gate,
                        range = neurons(todo[following] % perPair)
                    next = UnsafeRawBufferPointer(start: gate.base + range.lowerBound * gate.rowBytes, count: range.count * gate.rowBytes)
                }
                session.currentExperts[pair.expert]!.fusedReGLU(
                    neurons: neurons(todo[slice] % perPair), token: x.rows(from: pair.token), weight: pair.weight,
                    into: out, scratch: scratch, prefetching: next)
                slice = following < todo.count ? following : session.nextSlice.add(1, ordering: .relaxed).oldValue
            }
        }
    }

    /// Expert `expert` of layer `index`, from the cache when streaming, else from the mapping.
    func expertWeights(layer: LayerWeights, index: Int, expert e: Int) throws(EngineError) -> ExpertWeights {
        guard let expertCache else { return layer.experts[e] }
        let mapped = model.mappedExperts[index][e]
        let bundle = model.package.manifest.bundles[index * model.config.expertCount + e]
        let slot = try expertCache.acquire(layer: index, expert: e)
        let bundleStart = model.package.mapping.bytes.baseAddress! + bundle.offset
        func moved(_ w: WeightMatrix) -> WeightMatrix {
            WeightMatrix(
                name: w.name, base: slot + (w.base - bundleStart), dtype: w.dtype, rows: w.rows, columns: w.columns, layout: w.layout)
        }
        return ExpertWeights(gate: moved(mapped.gate), up: moved(mapped.up), down: moved(mapped.down))
    }
}

/// One token's use of one expert in a decode step, with its mixture weight.
struct ExpertPair {
    var expert: Int
    var token: Int
    var weight: Float
}

/// What the workers of one expert group read and write: the input, the routing, the chosen
/// experts' weights, and each worker's output and scratch buffers (Session's, by worker index).
/// A worker takes a slice of every chosen expert's neurons: gate, up and down rows j sit together
/// in the neuron-major bundle. Gate for every token; up and down only where the ReLU lets the
/// neuron through (ReGLU sparsity: a neuron with gate ≤ 0 contributes exactly nothing).
struct ExpertWork: @unchecked Sendable {
    struct Input {
        let floats: UnsafePointer<Float>  // (batch, hidden): h
        let quantized: QuantizedActivations?  // h in Q8_0, when an expert reads it
        let gathered: QuantizedActivations?  // (batch · active, hidden): a batch's h by expert
    }

    let input: Input
    let routing: ExpertAssignments
    let experts: [ExpertWeights?]
    let hidden: Int, ffn: Int
    let session: Session
    /// Session's `activationRows` while it records activations.
    let activations: UnsafeMutablePointer<Float>?

    init(session: Session, input: Input) {
        self.session = session
        self.input = input
        routing = session.assignments
        experts = session.currentExperts
        hidden = session.model.config.hiddenSize
        ffn = session.model.config.expertFFNSize
        activations = session.expertActivationHook != nil ? session.activationRows : nil
    }

    /// Worker `worker` of `workers`: its share of expert `e`'s neurons for every token that chose it.
    func run(_ expert: ExpertWeights, _ e: Int, worker: Int, of workers: Int) {
        let unit = expert.neuronUnit
        let neurons = unit * (ffn / unit * worker / workers)..<unit * (ffn / unit * (worker + 1) / workers)
        let b = Session.maximumBatch
        let count = routing.counts[e], tokens = routing.tokens + e * b, weights = routing.weights + e * b
        let out = session.partials + worker * b * hidden
        let scratch = Scratch(session: session, worker: worker, ffn: ffn)
        // Where the expert's first token's activations go when they are recorded.
        let record = activations.map { $0 + routing.firstRow[e] * ffn }
        if count > 1, let gathered = input.gathered {
            let x = gathered.rows(from: routing.firstRow[e])
            switch expert.batchPath {
            case .grouped:
                return groupedBatch(expert, neurons, x, count: count, tokens: tokens, weights: weights, out: out, scratch, record: record)
            case .quantizedRows:
                return rowsBatch(expert, neurons, x, count: count, tokens: tokens, weights: weights, out: out, scratch, record: record)
            case .tokenByToken: break
            }
        }
        for i in 0..<count {
            let t = tokens[i], y = out + t * hidden, recordRow = record.map { $0 + i * ffn }
            switch expert.tokenPath {
            case .groupedQ4_0 where record == nil, .rowsQ4_0 where record == nil:
                expert.fusedReGLU(
                    neurons: neurons, token: input.quantized!.rows(from: t), weight: weights[i], into: y, scratch: scratch.activations)
            case .groupedQ4_0, .groupedOtherDown:
                groupedToken(expert, neurons, t, weight: weights[i], into: y, scratch, record: recordRow)
            case .rowsQ4_0, .generic:
                genericToken(expert, neurons, t, weight: weights[i], into: y, scratch, record: recordRow)
            }
        }
    }

    /// A worker's scratch buffers (Session's, at the worker's offset).
    struct Scratch {
        let activations: UnsafeMutablePointer<Float>  // gate, then gate·up (max(2·ffn, 16·batch))
        let active: UnsafeMutablePointer<Int32>  // active neurons, or per token their count
        let upTokens: UnsafeMutablePointer<Int32>  // (batch): the tokens whose gate lets an up row through
        let downRows: UnsafeMutablePointer<Int32>  // (batch, ffn): per token, its down rows
        let downScales: UnsafeMutablePointer<Float>  // (batch, ffn): and their coefficients
        let pairRows: UnsafeMutablePointer<Int32>  // (2·ffn): two tokens' rows merged
        let pairCoefficients: UnsafeMutablePointer<Float>  // (4·ffn)

        init(session s: Session, worker: Int, ffn: Int) {
            let b = Session.maximumBatch
            activations = s.gateBuffers + worker * Session.gateBufferStride(ffn: ffn)
            active = s.activeIndices + worker * max(ffn, b)
            upTokens = s.upTokens + worker * b
            downRows = s.downRows + worker * b * ffn
            downScales = s.downScales + worker * b * ffn
            pairRows = s.pairRows + worker * 2 * ffn
            pairCoefficients = s.pairCoefficients + worker * 4 * ffn
        }
    }

    /// `.grouped` batch: eight neurons at a time, gate for all of the expert's tokens and up for
    /// the tokens each neuron's gate lets through (all of them for row_major_x8 up rows), then
    /// down for each (token, neuron) the ReLU lets through. Q4_0 down rows are listed per token and
    /// added in one pass of the many-row kernel, two tokens at a time; other types one by one.
    private func groupedBatch(
        _ expert: ExpertWeights, _ neurons: Range<Int>, _ x: QuantizedRows, count: Int,
        tokens: UnsafePointer<Int>, weights: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, _ s: Scratch,
        record: UnsafeMutablePointer<Float>?
    ) {
        let gates = s.activations, ups = s.activations + 8 * count
        let listDown = expert.down.dtype == .q4_0
        let listed = UnsafeMutableBufferPointer(start: s.active, count: count)
        listed.update(repeating: 0)
        for j in stride(from: neurons.lowerBound, to: neurons.upperBound, by: 8) {
            expert.gate.dotGroup(at: j, x, tokens: count, into: gates, stride: 8)
            guard (0..<8 * count).contains(where: { gates[$0] > 0 }) else { continue }
            if expert.up.layout == .rowMajorB8 {
                // Each up row only for the tokens whose gate lets it through: about half of them
                // in random-weight models, 13-30% in the trained fixture.
                for r in 0..<8 {
                    var n = 0
                    for i in 0..<count where gates[8 * i + r] > 0 {
                        s.upTokens[n] = Int32(i)
                        n += 1
                    }
                    if n > 0 {
                        expert.up.dotBlockGrouped(rows: j + r..<j + r + 1, x, tokens: n, listed: s.upTokens, into: ups + r, stride: 8)
                    }
                }
            } else {
                expert.up.dotGroup(at: j, x, tokens: count, into: ups, stride: 8)
            }
            for i in 0..<count {
                for r in 0..<8 where gates[8 * i + r] > 0 {
                    record?[i * ffn + j + r] = gates[8 * i + r] * ups[8 * i + r]
                    let scale = weights[i] * gates[8 * i + r] * ups[8 * i + r]
                    if listDown {
                        let at = i * ffn + Int(listed[i])
                        s.downRows[at] = Int32(j + r)
                        s.downScales[at] = scale
                        listed[i] += 1
                    } else {
                        DotKernels.addScaledRow(
                            expert.down.row(j + r), dtype: expert.down.dtype, scale: scale, into: out + tokens[i] * hidden, hidden)
                    }
                }
            }
        }
        guard listDown else { return }
        var i = 0
        while i + 1 < count {
            expert.down.addRows(
                s.downRows + i * ffn, coefficients: s.downScales + i * ffn, count: Int(listed[i]), into: out + tokens[i] * hidden,
                and: s.downRows + (i + 1) * ffn, coefficients: s.downScales + (i + 1) * ffn, count: Int(listed[i + 1]),
                into: out + tokens[i + 1] * hidden, scratch: (s.pairRows, s.pairCoefficients))
            i += 2
        }
        if i < count {
            expert.down.addRows(
                s.downRows + i * ffn, coefficients: s.downScales + i * ffn, count: Int(listed[i]), into: out + tokens[i] * hidden)
        }
    }

    /// `.quantizedRows` batch: row by row, gate for all of the expert's tokens at once, then up
    /// and down for the tokens that activate the neuron, while its rows are in cache.
    private func rowsBatch(
        _ expert: ExpertWeights, _ neurons: Range<Int>, _ x: QuantizedRows, count: Int,
        tokens: UnsafePointer<Int>, weights: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, _ s: Scratch,
        record: UnsafeMutablePointer<Float>?
    ) {
        let gates = s.activations
        for j in neurons {
            if expert.gate.dtype == .q4_0 {
                st_dot_q4_0_tokens(expert.gate.row(j), x.scales, x.values, x.sums, Int32(x.blocks), Int32(count), gates, 1)
            } else {
                st_dot_q8_0_tokens(expert.gate.row(j), x.scales, x.values, x.sums, Int32(x.blocks), Int32(count), gates, 1)
            }
            for i in 0..<count where gates[i] > 0 {
                let t = tokens[i]
                let up = expert.up.dot(row: j, input.floats + t * hidden, input.quantized, token: t)
                record?[i * ffn + j] = gates[i] * up
                DotKernels.addScaledRow(
                    expert.down.row(j), dtype: expert.down.dtype, scale: weights[i] * gates[i] * up,
                    into: out + t * hidden, hidden)
            }
        }
    }

    /// `.groupedOtherDown`, one token: groups for gate and up, then the down rows one by one in
    /// their own type.
    private func groupedToken(
        _ expert: ExpertWeights, _ neurons: Range<Int>, _ t: Int, weight: Float, into y: UnsafeMutablePointer<Float>,
        _ s: Scratch, record: UnsafeMutablePointer<Float>?
    ) {
        let x = input.quantized!.rows(from: t)
        let gates = s.activations, ups = s.activations + 8
        for j in stride(from: neurons.lowerBound, to: neurons.upperBound, by: 8) {
            expert.gate.dotGroup(at: j, x, tokens: 1, into: gates, stride: 1)
            guard (0..<8).contains(where: { gates[$0] > 0 }) else { continue }
            if expert.up.layout == .rowMajorB8 {
                for r in 0..<8 where gates[r] > 0 {
                    ups[r] = expert.up.dot(row: j + r, input.floats + t * hidden, input.quantized, token: t)
                }
            } else {
                expert.up.dotGroup(at: j, x, tokens: 1, into: ups, stride: 1)
            }
            for r in 0..<8 where gates[r] > 0 {
                record?[j + r] = gates[r] * ups[r]
                DotKernels.addScaledRow(
                    expert.down.row(j + r), dtype: expert.down.dtype, scale: weight * (gates[r] * ups[r]), into: y, hidden)
            }
        }
    }

    /// `.generic`, one token: three passes over the worker's rows, each streaming through one
    /// matrix: gate for every neuron, up where the gate is positive, then down.
    private func genericToken(
        _ expert: ExpertWeights, _ neurons: Range<Int>, _ t: Int, weight: Float, into y: UnsafeMutablePointer<Float>,
        _ s: Scratch, record: UnsafeMutablePointer<Float>?
    ) {
        let x = input.floats + t * hidden
        let activations = s.activations
        if expert.gate.layout == .rowMajorX8 {
            let q = input.quantized!.rows(from: t)
            for j in stride(from: neurons.lowerBound, to: neurons.upperBound, by: 8) {
                expert.gate.dotGroup(at: j, q, tokens: 1, into: activations + j, stride: 1)
            }
        } else {
            for j in neurons { activations[j] = expert.gate.dot(row: j, x, input.quantized, token: t) }
        }
        var active = 0
        for j in neurons where activations[j] > 0 {
            s.active[active] = Int32(j)
            active += 1
        }
        for a in 0..<active {
            let j = Int(s.active[a])
            if expert.up.layout == .rowMajorX8 {
                // Grouped up rows with plain gate rows (a --tensor-type override): the row's
                // group, and its share of it.
                let ups = activations + ffn
                expert.up.dotGroup(at: j / 8 * 8, input.quantized!.rows(from: t), tokens: 1, into: ups, stride: 1)
                activations[j] *= ups[j % 8]
                continue
            }
            if a + 2 < active { DotKernels.prefetch(expert.up.row(Int(s.active[a + 2])), bytes: expert.up.rowBytes) }
            activations[j] *= expert.up.dot(row: j, x, input.quantized, token: t)
        }
        for a in 0..<active {
            let j = Int(s.active[a])
            record?[j] = activations[j]
            if a + 2 < active { DotKernels.prefetch(expert.down.row(Int(s.active[a + 2])), bytes: expert.down.rowBytes) }
            DotKernels.addScaledRow(expert.down.row(j), dtype: expert.down.dtype, scale: weight * activations[j], into: y, hidden)
        }
    }
}
