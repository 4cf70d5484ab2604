import CKernels

#if canImport(Glibc)
import Glibc
#endif

/// Which tokens of a batch each expert serves, with their mixture weights. Storage is allocated
/// once per session: routing a token allocates nothing.
final class ExpertAssignments: @unchecked Sendable {
    let experts: Int
    let active: Int
    let batch: Int
    let counts: UnsafeMutablePointer<Int>      // (experts)
    let tokens: UnsafeMutablePointer<Int>      // (experts, batch)
    let weights: UnsafeMutablePointer<Float>   // (experts, batch)
    let firstRow: UnsafeMutablePointer<Int>    // (experts): where an expert's tokens start in the gathered batch
    let chosen: UnsafeMutablePointer<Int>      // (active): one token's choice, best first
    let used: UnsafeMutablePointer<Int>        // (experts): the experts any token of the batch chose
    var usedCount = 0
    let chosenWeights: UnsafeMutablePointer<Float> // (active)

    init(experts: Int, active: Int, batch: Int) {
        self.experts = experts
        self.active = active
        self.batch = batch
        counts = .allocate(capacity: experts)
        tokens = .allocate(capacity: experts * batch)
        weights = .allocate(capacity: experts * batch)
        firstRow = .allocate(capacity: experts)
        chosen = .allocate(capacity: active)
        used = .allocate(capacity: experts)
        chosenWeights = .allocate(capacity: active)
    }

    deinit {
        counts.deallocate(); tokens.deallocate(); weights.deallocate()
        firstRow.deallocate(); chosen.deallocate(); used.deallocate(); chosenWeights.deallocate()
    }

    /// The `k` largest of `count` logits, best first, the lower index on ties: the routing
    /// choice (and the cross-layer prediction and statistics made the same way).
    static func topK(_ logits: UnsafePointer<Float>, count: Int, k: Int, into chosen: UnsafeMutablePointer<Int>) {
        for r in 0..<k {
            var best = -1
            for e in 0..<count {
                var taken = false
                for i in 0..<r where chosen[i] == e { taken = true; break }
                if !taken && (best < 0 || logits[e] > logits[best]) { best = e }
            }
            chosen[r] = best
        }
    }

    /// Chooses token `t`'s experts from its router logits: the top k by logit (lower index on
    /// ties), weighted by softmax over the chosen logits or by sigmoid normalised over them.
    func route(token t: Int, logits: UnsafePointer<Float>, softmax: Bool) {
        ExpertAssignments.topK(logits, count: experts, k: active, into: chosen)
        var total: Float = 0
        for k in 0..<active {
            let w = softmax ? exp(logits[chosen[k]] - logits[chosen[0]]) : 1 / (1 + exp(-logits[chosen[k]]))
            chosenWeights[k] = w
            total += w
        }
        for k in 0..<active {
            chosenWeights[k] /= total
            let e = chosen[k]
            tokens[e * batch + counts[e]] = t
            weights[e * batch + counts[e]] = chosenWeights[k]
            counts[e] += 1
        }
    }
}

extension Session {
    /// Chooses every token's experts from the router logits (computed before attention).
    func route(layer index: Int, count n: Int) {
        let c = model.config
        let routing = assignments
        routing.counts.update(repeating: 0, count: c.expertCount)
        for t in 0..<n {
            routing.route(token: t, logits: routerLogits + t * c.expertCount, softmax: c.routerSoftmax)
            if let routingObserver {
                let logits = routerLogits + t * c.expertCount
                let chosen = (0..<c.activeExperts).map { routing.chosen[$0] }
                let runnerUp = (0..<c.expertCount).filter { !chosen.contains($0) }.map { logits[$0] }.max() ?? -.infinity
                routingObserver(RoutingDecision(layer: index, position: position + t, experts: chosen,
                                                weights: (0..<c.activeExperts).map { routing.chosenWeights[$0] },
                                                margin: logits[chosen[c.activeExperts - 1]] - runnerUp))
            }
        }
        routing.usedCount = 0
        for e in 0..<c.expertCount where routing.counts[e] > 0 {
            routing.used[routing.usedCount] = e
            routing.usedCount += 1
        }
    }

    /// x += Σ weight_e · down_e(relu(gate_e · h) ⊙ (up_e · h)), h = rmsnorm(x), over the chosen experts.
    func mixExperts(layer: LayerWeights, index: Int, count n: Int) throws(EngineError) {
        let c = model.config
        let routing = assignments
        normed.setCount(n)
        for t in 0..<n { rmsNorm(residual.row(t), layer.ffnNorm, into: normed.row(t)) }
        expertInputHook?(index, position, UnsafeBufferPointer(start: normed.floats, count: n * c.hiddenSize))
        let quantizedInput = layer.experts.contains { $0.gate.dtype.isQuantized || $0.up.dtype.isQuantized }
        let quantized = quantizedInput ? normed.quantizedForm() : nil
        let ffn = c.expertFFNSize, hidden = c.hiddenSize, b = Session.maximumBatch
        // In a batch, each expert's tokens are gathered side by side so that one gate row serves
        // all of them through the many-token kernel (the row is unpacked once).
        var batched: QuantizedActivations? = nil
        if n > 1, quantized != nil {
            expertInputs.setCount(0)
            for e in 0..<c.expertCount {
                routing.firstRow[e] = expertInputs.count
                for i in 0..<routing.counts[e] { expertInputs.append(row: routing.tokens[e * b + i], of: normed) }
            }
            batched = expertInputs.quantizedForm()
        }
        // Each worker takes a slice of every chosen expert's neurons: gate, up and down rows j
        // sit together in the neuron-major bundle. Gate for every token; up and down only where
        // the ReLU lets the neuron through (ReGLU sparsity: a neuron with gate ≤ 0 contributes
        // exactly nothing). Workers add into their own buffer, summed in worker order.
        let workers = max(1, min(threads, ffn))
        for worker in 0..<workers { (partials + worker * b * hidden).update(repeating: 0, count: n * hidden) }
        // The chosen experts' weights: views into the mapping, or bundles from the cache (the
        // reads were started before attention; this waits only for those not yet done). With a
        // cache, a batch that chose more experts than it has slots runs in groups that fit.
        let chosen = UnsafeBufferPointer(start: routing.used, count: routing.usedCount)
        let groupSize = expertCache.map { max(1, min($0.slotCount, chosen.count)) } ?? max(1, chosen.count)
        var groupStart = 0
        while groupStart < chosen.count {
            let group = chosen[groupStart..<min(groupStart + groupSize, chosen.count)]
            for e in 0..<c.expertCount { currentExperts[e] = nil }
            // The layouts the experts are computed in: as stored when streamed, else as loaded.
            let layouts = expertCache == nil ? layer.experts : model.mappedExperts[index]
            if n == 1, workers > 1, group.count <= c.activeExperts, let q = quantized,
               group.allSatisfy({ layouts[$0].groupedGateUp && layouts[$0].down.dtype == .q4_0 }) {
                // Streaming: the experts already in memory are computed while the reads of the
                // others finish. Each slice has its own sum and the sums are added in the same
                // order whatever ran first, so the result is the unbudgeted one bit for bit.
                let group = UnsafeBufferPointer(rebasing: group)
                let resident = expertCache.map { cache in group.map { cache.isReady(layer: index, expert: $0) } } ?? group.map { _ in true }
                for phase in [true, false] where resident.contains(phase) {
                    for (i, e) in group.enumerated() where resident[i] == phase {
                        currentExperts[e] = try expertWeights(layer: layer, index: index, expert: e)
                    }
                    decodeSlices(group, computing: resident.map { $0 == phase }, weights: routing, input: q, workers: workers)
                }
                st_add_rows(partials, sliceSums, Int32(group.count * Session.decodeSlices), Int32(hidden), Int32(hidden))
                expertCache?.release(layer: index, experts: group)
                groupStart += group.count
                continue
            }
            for e in group { currentExperts[e] = try expertWeights(layer: layer, index: index, expert: e) }
            let work = Unchecked((currentExperts, routing, partials, normed.floats, quantized, gateBuffers, activeIndices, batched, downRows, downScales,
                                  pairRows, pairCoefficients))
            parallelForOnThisTier(workers) { worker in
                let (experts, routing, partials, floats, quantized, gateBuffers, activeIndices, batched, downRows, downScales,
                     pairRows, pairCoefficients) = work.value
                let scales = quantized?.scales, values = quantized?.values, sums = quantized?.sums
                let out = partials + worker * b * hidden
                let blocks = hidden / 32
                let activations = gateBuffers + worker * max(2 * ffn, 16 * b)
                let activeRows = activeIndices + worker * max(ffn, b)
                for e in 0..<routing.experts where routing.counts[e] > 0 && experts[e] != nil {
                    let expert = experts[e]!
                    let count = routing.counts[e], tokens = routing.tokens + e * b, weights = routing.weights + e * b
                    // Neuron ranges in whole groups of eight when gate or up rows are grouped.
                    let unit = expert.gate.layout == .q4_0x8 || expert.up.layout == .q4_0x8 ? 8 : 1
                    let first = unit * (ffn / unit * worker / workers), last = unit * (ffn / unit * (worker + 1) / workers)
                    if expert.groupedGateUp {
                        let (scales, values, sums) = (scales!, values!, sums!)
                        let upRows = expert.up.layout == .q4_0b8
                        if count > 1, let batched {
                            // Eight neurons at a time: gate and up for all of the expert's tokens,
                            // then down for each (token, neuron) the ReLU lets through. Q4_0 down
                            // rows are listed per token and added in one pass of the many-row
                            // kernel; rows of other types are added one by one.
                            let ups = activations + 8 * count
                            let base = routing.firstRow[e]
                            let listDown = expert.down.dtype == .q4_0
                            let rows = downRows + worker * b * ffn, rowScales = downScales + worker * b * ffn
                            let listed = UnsafeMutableBufferPointer(start: activeRows, count: count)
                            listed.update(repeating: 0)
                            for j in stride(from: first, to: last, by: 8) {
                                st_matmul_q4_0_x8(expert.gate.base + j * expert.gate.rowBytes, Int32(blocks), 0, 1, batched.scales + base * blocks,
                                                  batched.values + base * hidden, batched.sums + base * blocks, Int32(count), activations, 8)
                                var any = false
                                for i in 0..<8 * count where activations[i] > 0 { any = true; break }
                                if !any { continue }
                                if upRows {
                                    // The group's eight up rows, two at a time, for all the tokens.
                                    st_matmul_q4_0_b8(expert.up.row(j), Int32(expert.up.rowBytes), 0, 8,
                                                      batched.scales + base * blocks, batched.interleaved! + base * hidden,
                                                      batched.sums + base * blocks, Int32(blocks), Int32(count), ups, 8)
                                } else {
                                    st_matmul_q4_0_x8(expert.up.base + j * expert.up.rowBytes, Int32(blocks), 0, 1, batched.scales + base * blocks,
                                                      batched.values + base * hidden, batched.sums + base * blocks, Int32(count), ups, 8)
                                }
                                for i in 0..<count {
                                    for r in 0..<8 where activations[8 * i + r] > 0 {
                                        let scale = weights[i] * activations[8 * i + r] * ups[8 * i + r]
                                        if listDown {
                                            let at = i * ffn + Int(listed[i])
                                            rows[at] = Int32(j + r)
                                            rowScales[at] = scale
                                            listed[i] += 1
                                        } else {
                                            DotKernels.addScaledRow(expert.down.row(j + r), dtype: expert.down.dtype, scale: scale,
                                                                    into: out + tokens[i] * hidden, hidden)
                                        }
                                    }
                                }
                            }
                            if listDown {
                                // Tokens two at a time: a row both use is unpacked once.
                                let merged = pairRows + worker * 2 * ffn, coefficients = pairCoefficients + worker * 4 * ffn
                                var i = 0
                                while i + 1 < count {
                                    st_axpy_rows_q4_0_pair(expert.down.base, Int32(expert.down.rowBytes), rows + i * ffn, rowScales + i * ffn, listed[i],
                                                           rows + (i + 1) * ffn, rowScales + (i + 1) * ffn, listed[i + 1],
                                                           out + tokens[i] * hidden, out + tokens[i + 1] * hidden, Int32(hidden),
                                                           merged, coefficients, coefficients + 2 * ffn)
                                    i += 2
                                }
                                if i < count {
                                    st_axpy_rows_q4_0(expert.down.base, Int32(expert.down.rowBytes), rows + i * ffn, rowScales + i * ffn, listed[i],
                                                      out + tokens[i] * hidden, Int32(hidden))
                                }
                            }
                        } else {
                            for i in 0..<count {
                                let t = tokens[i]
                                if expert.down.dtype == .q4_0 {
                                    st_expert_q4_0_x8(expert.gate.base, expert.up.base, expert.down.base, Int32(expert.gate.rowBytes),
                                                      Int32(first), Int32(last), scales + t * blocks, values + t * hidden,
                                                      upRows ? quantized!.interleaved! + t * hidden : nil, sums + t * blocks,
                                                      Int32(blocks), weights[i], out + t * hidden, activations, nil, 0)
                                    continue
                                }
                                // A down matrix of another type (a --tensor-type override): groups
                                // for gate and up, then its rows one by one in their own type.
                                let g8 = activations, u8 = activations + 8
                                for j in stride(from: first, to: last, by: 8) {
                                    st_matmul_q4_0_x8(expert.gate.base + j * expert.gate.rowBytes, Int32(blocks), 0, 1, scales + t * blocks,
                                                      values + t * hidden, sums + t * blocks, 1, g8, 1)
                                    guard (0..<8).contains(where: { g8[$0] > 0 }) else { continue }
                                    if upRows {
                                        for r in 0..<8 where g8[r] > 0 { u8[r] = expert.up.dot(row: j + r, floats + t * hidden, quantized, token: t) }
                                    } else {
                                        st_matmul_q4_0_x8(expert.up.base + j * expert.up.rowBytes, Int32(blocks), 0, 1, scales + t * blocks,
                                                          values + t * hidden, sums + t * blocks, 1, u8, 1)
                                    }
                                    for r in 0..<8 where g8[r] > 0 {
                                        DotKernels.addScaledRow(expert.down.row(j + r), dtype: expert.down.dtype, scale: weights[i] * (g8[r] * u8[r]),
                                                                into: out + t * hidden, hidden)
                                    }
                                }
                            }
                        }
                        continue
                    }
                    if count > 1, let batched, expert.gate.dtype.isQuantized, expert.gate.layout == .rows, expert.up.layout == .rows {
                        // Row by row: gate for all of the expert's tokens at once, then up and down
                        // for the tokens that activate the neuron, while its rows are in cache.
                        for j in first..<last {
                            DotKernels.quantizedTokens(expert.gate.row(j), dtype: expert.gate.dtype, batched, first: routing.firstRow[e],
                                                       tokens: count, into: activations, outStride: 1)
                            for i in 0..<count where activations[i] > 0 {
                                let t = tokens[i]
                                let u = MatMul.dot(expert.up.row(j), expert.up.dtype, floats + t * hidden, scales.map { $0 + t * blocks },
                                                   values.map { $0 + t * hidden }, sums.map { $0 + t * blocks }, hidden)
                                DotKernels.addScaledRow(expert.down.row(j), dtype: expert.down.dtype, scale: weights[i] * activations[i] * u,
                                                        into: out + t * hidden, hidden)
                            }
                        }
                        continue
                    }
                    for i in 0..<count {
                        let t = tokens[i]
                        if expert.gate.dtype == .q4_0 && expert.up.dtype == .q4_0 && expert.down.dtype == .q4_0,
                           expert.gate.layout == .rows && expert.up.layout == .rows, let scales, let values, let sums {
                            // The common case, all in C: gate, then up and down for the active neurons.
                            st_expert_q4_0(expert.gate.base, expert.up.base, expert.down.base, Int32(expert.gate.rowBytes),
                                           Int32(first), Int32(last), scales + t * blocks, values + t * hidden, sums + t * blocks,
                                           Int32(blocks), weights[i], out + t * hidden, activations)
                            continue
                        }
                        let x = floats + t * hidden
                        let xs = scales.map { $0 + t * blocks }, xq = values.map { $0 + t * hidden }, xsum = sums.map { $0 + t * blocks }
                        // Three passes over this worker's rows, each streaming through one matrix:
                        // gate for every neuron, up where the gate is positive, then down.
                        if expert.gate.layout == .q4_0x8 {
                            for j in stride(from: first, to: last, by: 8) {
                                st_matmul_q4_0_x8(expert.gate.base + j * expert.gate.rowBytes, Int32(blocks), 0, 1, xs!, xq!, xsum!, 1, activations + j, 1)
                            }
                        } else {
                            for j in first..<last { activations[j] = expert.gate.dot(row: j, x, quantized, token: t) }
                        }
                        var active = 0
                        for j in first..<last where activations[j] > 0 {
                            activeRows[active] = Int32(j)
                            active += 1
                        }
                        for a in 0..<active {
                            let j = Int(activeRows[a])
                            if expert.up.layout == .q4_0x8 {
                                // Grouped up rows with plain gate rows (a --tensor-type override):
                                // the row's group, and its share of it.
                                let u8 = activations + ffn
                                st_matmul_q4_0_x8(expert.up.base + j / 8 * 8 * expert.up.rowBytes, Int32(blocks), 0, 1, xs!, xq!, xsum!, 1, u8, 1)
                                activations[j] *= u8[j % 8]
                                continue
                            }
                            if a + 2 < active { DotKernels.prefetch(expert.up.row(Int(activeRows[a + 2])), bytes: expert.up.rowBytes) }
                            activations[j] *= expert.up.dot(row: j, x, quantized, token: t)
                        }
                        let y = out + t * hidden
                        for a in 0..<active {
                            let j = Int(activeRows[a])
                            if a + 2 < active { DotKernels.prefetch(expert.down.row(Int(activeRows[a + 2])), bytes: expert.down.rowBytes) }
                            DotKernels.addScaledRow(expert.down.row(j), dtype: expert.down.dtype, scale: weights[i] * activations[j], into: y, hidden)
                        }
                    }
                }
            }
            expertCache?.release(layer: index, experts: group)
            groupStart += group.count
        }
        mixture.update(from: partials, count: n * hidden)
        st_add_rows(mixture, partials + b * hidden, Int32(workers - 1), Int32(b * hidden), Int32(n * hidden))
        st_add_rows(residual.floats, mixture, 1, 0, Int32(n * hidden))
        residual.setCount(n)
    }

    /// One token's chosen experts (gate and up grouped in eights) in slices of a quarter of their
    /// neurons, taken by whichever worker is free: the two cores rarely run at the same speed on
    /// a shared machine (the memory traffic of one slows the other), and a static half each left
    /// one waiting. Each slice adds into its own buffer and the buffers are summed in slice order,
    /// so the result is the same whoever took what. Computes the slices of the experts at the
    /// positions of `group` where `computing` is true, each into its own buffer of `sliceSums`
    /// (slice s of the group at s · hidden); the caller adds the buffers in order.
    func decodeSlices(_ group: UnsafeBufferPointer<Int>, computing: [Bool], weights routing: ExpertAssignments, input q: QuantizedActivations, workers: Int) {
        let c = model.config
        let hidden = c.hiddenSize, ffn = c.expertFFNSize, b = Session.maximumBatch, perExpert = Session.decodeSlices
        let groups = ffn / 8
        let todo = (0..<group.count * perExpert).filter { computing[$0 / perExpert] }
        let slices = todo.count
        nextSlice.store(0, ordering: .relaxed)
        // Slice part p of an expert: neurons first..<last, in whole groups of eight.
        func neurons(_ part: Int) -> (first: Int, last: Int) { (8 * (groups * part / perExpert), 8 * (groups * (part + 1) / perExpert)) }
        let work = Unchecked((self, group, routing, q, todo))
        parallelForOnThisTier(workers) { worker in
            let (session, group, routing, q, todo) = work.value
            let scratch = session.gateBuffers + worker * max(2 * ffn, 16 * b)
            // Each worker claims its next slice before adding the current one's down rows, and
            // fetches that slice's gate rows meanwhile (the down stage is arithmetic-bound); the
            // last two slices are left to whoever is free first.
            var slice = session.nextSlice.add(1, ordering: .relaxed).oldValue
            while slice < slices {
                var following = slices
                if session.nextSlice.load(ordering: .relaxed) + 2 <= slices {
                    following = session.nextSlice.add(1, ordering: .relaxed).oldValue
                }
                let e = group[todo[slice] / perExpert], part = todo[slice] % perExpert
                let expert = session.currentExperts[e]!
                // The token's weight for this expert (decode: one token, so the first entry).
                let weight = routing.weights[e * b]
                let out = session.sliceSums + todo[slice] * hidden
                out.update(repeating: 0, count: hidden)
                var next: UnsafeRawPointer? = nil, nextBytes = 0
                if following < slices {
                    let gate = session.currentExperts[group[todo[following] / perExpert]]!.gate, range = neurons(todo[following] % perExpert)
                    next = gate.base + range.first * gate.rowBytes
                    nextBytes = (range.last - range.first) * gate.rowBytes
                }
                let range = neurons(part)
                st_expert_q4_0_x8(expert.gate.base, expert.up.base, expert.down.base, Int32(expert.gate.rowBytes),
                                  Int32(range.first), Int32(range.last),
                                  q.scales, q.values, expert.up.layout == .q4_0b8 ? q.interleaved : nil, q.sums, Int32(hidden / 32),
                                  weight, out, scratch, next, Int32(nextBytes))
                slice = following < slices ? following : session.nextSlice.add(1, ordering: .relaxed).oldValue
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
            WeightMatrix(name: w.name, base: slot + (w.base - bundleStart), dtype: w.dtype, rows: w.rows, columns: w.columns, layout: w.layout)
        }
        return ExpertWeights(gate: moved(mapped.gate), up: moved(mapped.up), down: moved(mapped.down))
    }
}
