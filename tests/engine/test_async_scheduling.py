"""Async scheduling (a step queued before the previous one's tokens are read back) changes nothing in the output:
the same tokens, stops, finish reasons and text as the synchronous engine, with no leaked blocks.

On the CPU the "device" work runs at once, but the engine's bookkeeping is the one the GPU uses: pending
tokens fed to the next step from the sampled tensor (at any row of a batch of decodes and prefill chunks),
sequences ending while a step for them is queued, preemption of a sequence with a pending token, aborts.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ember import LLM, SamplingParams


@pytest.fixture(scope="module")
def make_llm(smol_llm):
    import torch

    from ember.config import EngineConfig
    from ember.engine.llm_engine import LLMEngine, load_model

    # float32 (the CPU default): this is about bookkeeping, and in bf16 on a GPU the different batch shapes of
    # the two runs may flip near-ties.
    loaded = smol_llm.engine.loaded
    if loaded.dtype != torch.float32:
        loaded = load_model(EngineConfig(dtype="float32"))

    def make(**kw):
        # A fixed cache size: on a GPU, sizing it from free memory would leave nothing for the next engine.
        kw.setdefault("num_gpu_blocks_override", 512)
        return LLM.from_engine(LLMEngine(EngineConfig(dtype="float32", **kw), loaded=loaded))

    return make


_LONG = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
         "had taught him, and when he reached the lamp room he wiped the salt from the glass, trimmed the wick, "
         "and looked out over the grey water for the fishing boats that were late coming home. One night")


@pytest.fixture(scope="module")
def prompts(smol_llm):
    tok = smol_llm.tokenizer
    texts = ["Hello, my name is", "The history of the Roman Empire begins", "List three colors: red,",
             "Python is a programming language that", "Once upon a time", "The capital of France is",
             "A long time ago in a galaxy far, far away, there lived a young farmer who dreamed of the stars",
             _LONG]
    # The chat template gives every prompt the same system prefix: full blocks the prefix cache shares.
    return [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


@pytest.fixture(scope="module")
def sync_mixed(make_llm, prompts):
    """The synchronous engine's summary of `prompts` under `_mixed_params()` for the given engine options: the
    reference several tests compare with, computed once per set of options."""
    cache: dict[tuple, list] = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            sync = make_llm(async_scheduling=False, **kw)
            cache[key] = _summary(sync.generate(prompts, _mixed_params()))
            _assert_no_leak(sync)
        return cache[key]

    return get


def _mixed_params() -> list[SamplingParams]:
    """Different lengths (some end by EOS, some by length), stop strings, n > 1, seeds, a min_tokens row, a
    penalised row (never queued ahead) and a long prompt."""
    return [
        SamplingParams(temperature=0, max_tokens=28),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop=[","]),
        SamplingParams(temperature=0.8, seed=3, max_tokens=25, n=2),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=11, max_tokens=20, min_tokens=12),
        SamplingParams(temperature=0, max_tokens=26, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, presence_penalty=0.5, ignore_eos=True),
    ]


def _summary(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]


def _assert_no_leak(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st["num_free_blocks"] == st["num_total_blocks"]
    assert st["num_running"] == st["num_waiting"] == 0
    assert all(b.ref_cnt == 0 for b in llm.engine.block_manager.blocks)


@dataclass
class Launch:
    """One step queued ahead, as the spy saw it before it ran."""

    decodes: int  # rows past the prompt with one new token that samples
    chunks: int  # everything else: prefill chunks, recomputation after preemption
    samples: int  # rows that sample
    pending_in_chunk: bool  # a chunk of several tokens whose last input is still on the device


def _spy_launches(llm: LLM) -> list[Launch]:
    runner = llm.engine.runner
    launches: list[Launch] = []
    launch = runner.launch

    def spied(sched, prev):
        rec = Launch(0, 0, 0, False)
        for item in sched.scheduled:
            seq = item.seq
            if item.num_new_tokens == 1 and item.samples and seq.num_computed_tokens >= seq.num_prompt_tokens:
                rec.decodes += 1
            else:
                rec.chunks += 1
                end = seq.num_computed_tokens + item.num_new_tokens
                rec.pending_in_chunk |= item.num_new_tokens > 1 and end > len(seq.token_ids)
            rec.samples += item.samples
        launches.append(rec)
        return launch(sched, prev)

    runner.launch = spied  # type: ignore[method-assign]
    return launches


@pytest.mark.parametrize("engine_kw", [
    {},
    # A small token budget (chunked prefills mixed with queued decodes) and a cache small enough to preempt.
    {"num_gpu_blocks_override": 40, "block_size": 4, "max_num_batched_tokens": 12, "max_num_seqs": 8},
    # Few sequences at a time: requests are admitted (prefix-cache hits, chunks) while others decode.
    {"block_size": 4, "max_num_batched_tokens": 24, "max_num_seqs": 3},
], ids=["default", "preempting", "admitting"])
def test_async_matches_sync(make_llm, prompts, sync_mixed, engine_kw):
    expected = sync_mixed(**engine_kw)
    llm = make_llm(async_scheduling=True, **engine_kw)
    launches = _spy_launches(llm)
    got = _summary(llm.generate(prompts, _mixed_params()))
    assert got == expected
    assert len(launches) > 10  # steps really were queued ahead
    if engine_kw:
        # Steps with prefill chunks were queued ahead too, next to decodes.
        assert any(r.chunks and r.decodes for r in launches)
        assert llm.engine.block_manager.prefix_hits > 0
    if "num_gpu_blocks_override" in engine_kw:
        assert llm.engine.scheduler.num_preemptions > 0
    _assert_no_leak(llm)


class _EagerGraph:
    """Stands in for a captured graph that holds its copies: `replay` runs what the capture records, reading the
    lengths (which the CPU's attention needs on the host) from the same staging set as the copies."""

    def __init__(self, graphs, turn: int, size: int) -> None:
        self.graphs, self.turn, self.size = graphs, turn, size
        self.replays = 0

    def replay(self) -> None:
        g = self.graphs
        lens = g._staging[self.turn][1][:self.size].tolist()
        g.outputs_of(self.turn, self.size)[self.size] = g._step_with_copies(self.turn, self.size, lens)
        self.replays += 1


def _uncaptured_graphs(eng, max_batch: int, copies_up_to: int = 0):
    """Decode graphs for `eng`'s runner that `run` executes eagerly (no capture: the CPU); up to `copies_up_to` rows,
    two stand-in graphs a size that hold their copies and the greedy tokens' read-back, as on a GPU."""
    from ember.engine.cuda_graphs import DecodeGraphs

    runner = eng.runner
    g = DecodeGraphs(runner.model, runner.kv_caches, runner.attn, max_batch,
                     -(-eng.max_model_len // eng.block_size), runner.device)
    g.holds_copies = {s for s in g.sizes if s <= copies_up_to}
    for b in g.holds_copies:
        g.graphs[b], g._twins[b] = _EagerGraph(g, 0, b), _EagerGraph(g, 1, b)
    return g


def _twin_replays(graphs) -> tuple[int, int]:
    """How often the stand-in graphs of each staging set ran."""
    return (sum(x.replays for x in graphs.graphs.values() if isinstance(x, _EagerGraph)),
            sum(x.replays for x in graphs._twins.values()))


@pytest.mark.parametrize("copies_in_graph", [False, True])
def test_decode_graphs_gather_their_inputs_and_take_greedy_tokens(make_llm, prompts, sync_mixed,
                                                                  copies_in_graph):
    """The decode graphs' forward, run uncaptured on the CPU (the one the GPU captures): its input tokens
    gathered on the device from wherever the step before left them, its greedy tokens taken inside it (and, with
    the copies in the graph, read back by it into the staging set of its turn). The outputs equal the synchronous
    engine's without graphs. With 4 rows a graph, the steps of more decodes run eagerly, and the graph step after
    one takes its inputs from that step's larger token tensor."""
    expected = sync_mixed()
    llm = make_llm(async_scheduling=True)
    graphs = llm.engine.runner.graphs = _uncaptured_graphs(llm.engine, max_batch=4,
                                                            copies_up_to=2 if copies_in_graph else 0)
    sources: list[str] = []
    read_back_by_graph = 0
    run = graphs.run

    def spied(batch, where=None, tokens=None):
        if where is None:
            sources.append("host")
        elif tokens.data_ptr() == graphs.tokens.data_ptr():
            sources.append("graph")
        else:
            sources.append("copied" if tokens.numel() <= graphs.max_batch else "gathered")
        nonlocal read_back_by_graph
        out = run(batch, where, tokens)
        read_back_by_graph += graphs.host_tokens is not None
        return out

    graphs.run = spied  # type: ignore[method-assign]
    assert _summary(llm.generate(prompts, _mixed_params())) == expected
    # Greedy steps after graph steps; sampled or eager steps before; eager steps of more rows than a graph holds.
    assert {"graph", "copied", "gathered"} <= set(sources)
    if copies_in_graph:  # both staging sets' graphs ran, and greedy steps took the tokens they read back
        assert min(_twin_replays(graphs)) > 0 and read_back_by_graph > 0
    else:
        assert read_back_by_graph == 0
    _assert_no_leak(llm)


def test_sampled_steps_take_the_logits_of_the_graph_that_ran(make_llm, prompts):
    """Two rows, sampled with seeds (so no step is greedy): every step replays a graph holding its copies, the two
    staging sets' graphs in turn, and the sampler must get the logits of the one that ran, which each leaves in
    its own output. The tokens equal the synchronous engine's without graphs."""
    params = [SamplingParams(temperature=0.8, seed=5 + i, max_tokens=24, ignore_eos=True) for i in range(2)]
    expected = _summary(make_llm(async_scheduling=False).generate(prompts[:2], params))
    llm = make_llm(async_scheduling=True)
    graphs = llm.engine.runner.graphs = _uncaptured_graphs(llm.engine, max_batch=4, copies_up_to=4)
    assert _summary(llm.generate(prompts[:2], params)) == expected
    assert min(_twin_replays(graphs)) > 5
    _assert_no_leak(llm)


@pytest.mark.parametrize("copies_in_graph", [False, True])
def test_a_step_failing_after_its_graph_replay_leaves_the_step_before_intact(make_llm, prompts, monkeypatch,
                                                                               copies_in_graph):
    """A greedy graph step's tokens stay in the graphs' buffer until the next replay overwrites them. If the step
    after fails once it has replayed (here: just after its replay), the engine retries it from the same step
    before, whose tokens must then still be its own: the outputs equal the synchronous engine's."""
    from ember.engine import model_runner

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = _summary(make_llm(async_scheduling=False).generate(prompts[:3], params))
    eng = make_llm(async_scheduling=True).engine
    graphs = eng.runner.graphs = _uncaptured_graphs(eng, max_batch=4, copies_up_to=4 if copies_in_graph else 0)
    real, calls = model_runner.argmax_suffices, []

    def flaky(batch):
        calls.append(1)
        if len(calls) == 4:  # a graph step queued after greedy graph steps
            raise RuntimeError("failed after the replay")
        return real(batch)

    monkeypatch.setattr(model_runner, "argmax_suffices", flaky)
    for i, p in enumerate(prompts[:3]):
        eng.add_request(f"r{i}", p, None, params.clone())
    finished = {}

    def run() -> None:
        while eng.has_unfinished_requests():
            finished.update({o.request_id: o for o in eng.step() if o.finished})

    with pytest.raises(RuntimeError, match="failed after the replay"):
        run()
    run()
    assert _summary([finished[f"r{i}"] for i in range(3)]) == expected
    assert min(_twin_replays(graphs)) > 0 or not copies_in_graph


@dataclass
class Stream:
    """What a client streaming one sequence saw: the token ids and text so far after each non-empty increment."""

    points: list[tuple[tuple[int, ...], str]]
    end: tuple[str, int | str | None] | None = None

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.points[-1][0] if self.points else ()


def _streams(outputs) -> dict[tuple[str, int], Stream]:
    out: dict[tuple[str, int], Stream] = {}
    for o in outputs:
        for c in o.outputs:
            st = out.setdefault((o.request_id, c.index), Stream([]))
            if c.delta_token_ids or c.delta_text:
                ids, text = st.points[-1] if st.points else ((), "")
                st.points.append((ids + tuple(c.delta_token_ids), text + c.delta_text))
            if c.finish_reason is not None and st.end is None:
                st.end = (c.finish_reason, c.stop_reason)
    return out


def _is_subsequence(short: list, long: list) -> bool:
    it = iter(long)
    return all(x in it for x in short)


def _drive(llm: LLM, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
           aborts: dict[int, list[str]]) -> list:
    """Step the engine, adding and aborting requests at given step numbers; returns every output in order."""
    eng = llm.engine
    outputs = []
    step = 0
    while step <= max(arrivals) or eng.has_unfinished_requests():
        for rid, ids, params in arrivals.get(step, []):
            eng.add_request(rid, None, ids, params.clone())
        for rid in aborts.get(step, []):
            eng.abort_request(rid)
        outputs.extend(eng.step())
        step += 1
    return outputs


def test_arrivals_while_others_decode_and_aborts(make_llm, prompts, smol_llm):
    """Requests arrive step after step, long prompts are chunked next to running decodes, one request is
    aborted while its prefill is under way and one while it decodes: each sequence streams the same tokens and
    text as with the synchronous engine. Only the grouping may differ: when a synchronous step follows a queued
    one, the queued step's token and the new one arrive in one output."""
    tok = smol_llm.tokenizer
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    arrivals = {
        0: [("a", ids[0], greedy), ("b", ids[1], SamplingParams(temperature=0, max_tokens=30, stop=[" the"]))],
        2: [("long", ids[7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))],
        4: [("n2", ids[3], SamplingParams(temperature=0.9, seed=5, max_tokens=15, n=2, ignore_eos=True))],
        5: [("doomed-prefill", ids[6] + ids[7], greedy)],
        7: [("min", ids[2], SamplingParams(temperature=0, max_tokens=10, min_tokens=6))],
        9: [("doomed-decode", ids[4], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))],
        11: [("late", ids[5], greedy), ("late-long", ids[7], greedy)],
    }
    aborts = {7: ["doomed-prefill"], 15: ["doomed-decode"]}
    kw = {"block_size": 4, "max_num_batched_tokens": 32, "max_num_seqs": 8}

    sync = make_llm(async_scheduling=False, **kw)
    expected = _streams(_drive(sync, arrivals, aborts))
    _assert_no_leak(sync)
    llm = make_llm(async_scheduling=True, **kw)
    launches = _spy_launches(llm)
    got = _streams(_drive(llm, arrivals, aborts))
    _assert_no_leak(llm)

    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        assert have.end == want.end, key
        if key[0].startswith("doomed"):
            continue
        assert have.points[-1] == want.points[-1], key
        assert _is_subsequence(have.points, want.points), key
    assert got[("doomed-prefill", 0)].points == expected[("doomed-prefill", 0)].points == []
    # Aborted mid-decode, the queued step's token is dropped: one token fewer than synchronously, at most.
    sync_toks, async_toks = expected[("doomed-decode", 0)].token_ids, got[("doomed-decode", 0)].token_ids
    assert async_toks == sync_toks[:len(async_toks)] and len(async_toks) >= len(sync_toks) - 1
    assert sum(1 for r in launches if r.chunks and r.decodes) >= 5
    assert llm.engine.block_manager.prefix_hits > 0


def test_steps_of_prompt_chunks_only_are_queued(make_llm, prompts, smol_llm):
    """A long prompt alone, in chunks: steps that sample nothing are queued ahead too."""
    ids = smol_llm.tokenizer.encode(prompts[7], add_special_tokens=False)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kw = {"block_size": 4, "max_num_batched_tokens": 16}
    expected = _summary(make_llm(async_scheduling=False, **kw).generate(prompt_token_ids=[ids], sampling_params=sp))
    llm = make_llm(async_scheduling=True, **kw)
    launches = _spy_launches(llm)
    assert _summary(llm.generate(prompt_token_ids=[ids], sampling_params=sp)) == expected
    assert sum(1 for r in launches if r.samples == 0) >= len(ids) // 16 - 1
    _assert_no_leak(llm)


def test_prompt_logprobs_request_keeps_its_steps_synchronous(make_llm, prompts):
    """Steps that compute prompt logprobs run synchronously; the others around them are still queued ahead."""
    # The last four prompts, the long one scored: its chunks share steps with the others' decodes.
    prompts, params = prompts[4:], _mixed_params()[4:]
    params[3] = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2, ignore_eos=True)
    kw = {"block_size": 4, "max_num_batched_tokens": 24, "max_num_seqs": 4}
    sync_out = make_llm(async_scheduling=False, **kw).generate(prompts, params)
    llm = make_llm(async_scheduling=True, **kw)
    eng = llm.engine
    launches = _spy_launches(llm)
    launch = eng.runner.launch

    def checked(sched, prev):
        assert not any(i.seq.request.wants_prompt_logprobs(i.seq) for i in sched.scheduled)
        return launch(sched, prev)

    eng.runner.launch = checked  # type: ignore[method-assign]
    out = llm.generate(prompts, params)
    assert _summary(out) == _summary(sync_out)
    got, want = out[3].prompt_logprobs, sync_out[3].prompt_logprobs
    assert got is not None and want is not None and len(got) == len(want) == len(out[3].prompt_token_ids)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g is not None and w is not None and list(g) == list(w)
        assert all(g[t].rank == w[t].rank and g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4) for t in g)
    assert any(r.chunks for r in launches)
    _assert_no_leak(llm)


def test_abort_with_a_step_in_flight(make_llm, prompts):
    llm = make_llm(async_scheduling=True)
    eng = llm.engine
    ids = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts[:3]]
    for i, p in enumerate(ids):
        eng.add_request(f"r{i}", None, p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert eng._inflight is not None
    eng.abort_request("r1")
    finished = _run_to_end(eng)
    assert finished["r1"].outputs[0].finish_reason == "abort"
    assert [len(finished[r].outputs[0].token_ids) for r in ("r0", "r2")] == [50, 50]
    # Whatever is still queued belongs to finished sequences only, and nothing leaked.
    assert eng._inflight is None or all(s.is_finished for s in eng._inflight.seqs)
    _assert_no_leak(llm)


def test_logprobs_and_grammar_rows_run_synchronously(make_llm, prompts):
    """Rows that need the host's view of the newest token are never queued ahead; the rest still are."""
    llm = make_llm(async_scheduling=True)
    launches = _spy_launches(llm)
    out = llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)] * 2)
    assert not launches
    assert all(len(c.logprobs) == 8 for o in out for c in o.outputs)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert launches
    _assert_no_leak(llm)


def _run_to_end(eng) -> dict:
    """Step until every request has finished; their final outputs by request id."""
    finished = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def _prompts_of_lengths(lengths: list[int]) -> list[list[int]]:
    return [list(range(1, n)) + [100 + n] for n in lengths]


def test_recomputed_one_token_chunk(make_llm):
    """A preempted sequence recomputed past its prompt can get a 1-token chunk that samples nothing (a budget
    of 4 with 3 decodes); queued ahead with the decodes, it gives the same tokens."""
    llm = make_llm(async_scheduling=False, block_size=4, max_num_batched_tokens=4, max_num_seqs=4)
    eng = llm.engine
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(4):
        eng.add_request(f"r{i}", None, list(range(1, 10)) + [10 + i], sp.clone())
    for _ in range(30):
        eng.step()
    victim = eng.scheduler.running[-1]
    eng.scheduler.running.remove(victim)
    eng.scheduler._preempt(victim)
    eng.async_scheduling = True
    launches = _spy_launches(llm)
    finished = _run_to_end(eng)
    assert sorted(finished) == ["r0", "r1", "r2", "r3"]
    assert all(len(o.outputs[0].token_ids) == 40 for o in finished.values())
    assert any(r.chunks and r.samples < r.chunks + r.decodes for r in launches)
    # The same prompts run synchronously from the start give the same tokens.
    ref = make_llm(async_scheduling=False).generate(
        prompt_token_ids=[list(range(1, 10)) + [10 + i] for i in range(4)], sampling_params=sp)
    assert [finished[f"r{i}"].outputs[0].token_ids for i in range(4)] == [o.outputs[0].token_ids for o in ref]
    _assert_no_leak(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_pending_token_inside_a_recompute_chunk(make_llm, prefix_caching):
    """A sequence preempted while its newest token is still on the device, and readmitted before it is read
    back, recomputes a chunk whose LAST input is that token: it is taken from the device at that row of the
    flat batch (after the other rows' decodes), not from the host."""
    prompts = _prompts_of_lengths([9, 10, 11, 13])
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm = make_llm(async_scheduling=True, block_size=4, max_num_batched_tokens=64, max_num_seqs=4,
                   enable_prefix_caching=prefix_caching)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", None, p, sp.clone())
    victim = None
    for _ in range(20):
        eng.step()
        assert eng._inflight is not None
        # The readmitted chunk is longer than one token when the known tokens end inside a block.
        candidates = [s for s in eng._inflight.seqs if s.num_pending == 1 and len(s.token_ids) % 4]
        if len(eng._inflight.seqs) == 4 and candidates:
            victim = candidates[0]
            break
    assert victim is not None
    # Preempted outside the scheduler (which would not readmit it in the same step), so the next step readmits
    # it while its newest token is pending.
    eng.scheduler.running.remove(victim)
    eng.scheduler._preempt(victim)
    launches = _spy_launches(llm)
    finished = _run_to_end(eng)
    assert launches[0].pending_in_chunk and launches[0].decodes == 3
    ref = make_llm(async_scheduling=False).generate(prompt_token_ids=prompts, sampling_params=sp)
    assert [finished[f"r{i}"].outputs[0].token_ids for i in range(4)] == [o.outputs[0].token_ids for o in ref]
    _assert_no_leak(llm)


def test_last_pending_token_takes_no_block(make_llm):
    """A sequence whose pending token is certainly its last (max_tokens 1 here, after a queued prefill) is not
    scheduled again: the block it would get cannot cost another sequence a preemption (4 blocks of 4 tokens,
    two 8-token prompts)."""
    prompts = [list(range(10, 18)), list(range(30, 38))]
    params = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)]
    results = {}
    for mode in (False, True):
        llm = make_llm(async_scheduling=mode, block_size=4, num_gpu_blocks_override=4, max_num_batched_tokens=16,
                       enable_prefix_caching=False)
        eng = llm.engine
        for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            eng.add_request(f"r{i}", None, p, sp)
        finished = _run_to_end(eng)
        results[mode] = {k: o.outputs[0].token_ids for k, o in finished.items()}
        assert eng.scheduler.num_preemptions == 0
        _assert_no_leak(llm)
    assert results[True] == results[False]


def test_a_one_token_prompt_with_prompt_logprobs_does_not_keep_steps_synchronous(make_llm):
    """A one-token prompt has nothing to score: its request must stop wanting prompt logprobs (which keeps the
    steps it is in synchronous and off the CUDA graphs) once it is running."""
    llm = make_llm(async_scheduling=True)
    eng = llm.engine
    eng.add_request("one", None, [5], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1,
                                                     ignore_eos=True))
    req = eng.requests["one"]
    assert not req.wants_prompt_logprobs(req.seqs[0])
    out = llm.generate(prompt_token_ids=[[5]], sampling_params=SamplingParams(temperature=0, max_tokens=4,
                                                                              prompt_logprobs=1, ignore_eos=True))
    assert out[0].prompt_logprobs in (None, [None]) and len(out[0].outputs[0].token_ids) == 4
    eng.abort_request("one")


def test_max_tokens_0_scores_the_prompt_without_a_token(make_llm, prompts):
    """max_tokens 0 ends a request after its prefill with no token ("length"), its prompt scored when asked,
    beside requests that generate; nothing leaks, and a prompt may fill the whole context. (Asynchronously: its
    token is pending when it ends. The synchronous engine is what the server tests run on a CPU.)"""
    async_scheduling = True
    kw = {"block_size": 4, "max_num_batched_tokens": 24, "max_num_seqs": 4, "max_model_len": 256}
    params = _mixed_params()
    params[2] = SamplingParams(max_tokens=0, prompt_logprobs=1)
    params[5] = SamplingParams(max_tokens=0, n=2)
    llm = make_llm(async_scheduling=async_scheduling, **kw)
    out = llm.generate(prompts, params)
    ref = make_llm(async_scheduling=async_scheduling, **kw).generate(
        [p for i, p in enumerate(prompts) if i not in (2, 5)], [p for i, p in enumerate(params) if i not in (2, 5)])
    assert _summary([o for i, o in enumerate(out) if i not in (2, 5)]) == _summary(ref)
    for i in (2, 5):
        assert out[i].finished and [(c.token_ids, c.text, c.finish_reason) for c in out[i].outputs] == \
            [([], "", "length")] * params[i].n
    scored = out[2].prompt_logprobs
    assert scored is not None and len(scored) == len(out[2].prompt_token_ids) and scored[0] is None and all(scored[1:])
    full = llm.generate(prompt_token_ids=[[7] * 256], sampling_params=SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert full[0].outputs[0].token_ids == [] and len(full[0].prompt_logprobs or []) == 256
    _assert_no_leak(llm)
    # No slot is kept for a token: a cache of exactly one context holds such a prompt.
    tight = make_llm(async_scheduling=async_scheduling, **kw | {"num_gpu_blocks_override": 64})
    assert tight.generate(prompt_token_ids=[[7] * 256], sampling_params=SamplingParams(max_tokens=0))[0].finished
