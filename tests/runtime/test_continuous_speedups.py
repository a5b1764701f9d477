"""In-flight batching with speculation, a prefix cache and chunked prefill: every row's output equals its
output alone without them (real ONNX Runtime sessions, tiny models), and each mechanism really ran."""

import numpy as np
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.constrain import Grammar
from qwen2edge.runtime.continuous import InFlightBatch
from qwen2edge.runtime.kv_cache import HostKVCache
from qwen2edge.runtime.prefix_cache import PrefixCache
from qwen2edge.runtime.sampling import SamplingParams
from qwen2edge.runtime.speculative import SpeculativeConfig, speculator_factory

SYSTEM = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 9707, 11, 1879]
PROMPTS = [SYSTEM + [9707, 11, 1879, 0], [40, 1079, 264, 1273, 13, 40, 1079], [3838], SYSTEM + [3838, 25, 3838]]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_token_ids=(-1,))


class Driver:
    """Runs an InFlightBatch; records results and, per step, every row's token count."""

    def __init__(self, gen, slots: int, **options):
        self.gen, self.batch = gen, InFlightBatch(gen, slots, **options)
        self.results: dict = {}
        self.history: list[dict] = []  # per step: key -> tokens so far (live rows) or None (in prefill)

    def admit(self, *items):
        self.batch.admit([(key, self.gen.new_row(prompt, params)) for key, prompt, params in items])

    def step(self, n: int = 1):
        for _ in range(n):
            self.batch.step(None, lambda k, r: self.results.__setitem__(k, r))
            self.history.append({e.key: None if e.filled is not None else len(e.row.result.token_ids)
                                 for e in self.batch.entries})

    def drain(self):
        while len(self.batch):
            self.step()


@pytest.fixture(scope="module")
def gqa(tiny_bundle_factory):
    bundle_dir = tiny_bundle_factory("gqa")[1]
    return bundle_dir, Bundle.open(bundle_dir).generator(cache_bucket=8)


def _alone(gen, prompt, params, speculator=None):
    return gen.generate([prompt], params, speculator=speculator)[0][0]


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
def test_speculating_rows_that_join_and_leave_equal_their_runs_alone(method, gqa):
    bundle_dir, gen = gqa
    make = speculator_factory(SpeculativeConfig(method, 4, 2, str(bundle_dir) if method == "draft" else None),
                              Bundle.open(bundle_dir), gen)
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, seed=3, stop_token_ids=(-1,))
    d = Driver(gen, 4, speculator=make())
    d.admit(("a", PROMPTS[0], _greedy(30)), ("b", PROMPTS[1], _greedy(6)))
    d.step(2)
    d.admit(("c", PROMPTS[2], sampled))
    d.step(3)
    d.admit(("d", PROMPTS[3], _greedy(20)))
    d.drain()
    for key, prompt, params in (("a", 0, _greedy(30)), ("b", 1, _greedy(6)), ("d", 3, _greedy(20))):
        assert d.results[key].token_ids == _alone(gen, PROMPTS[prompt], params).token_ids, key
    # A sampled row draws from its own generator: the same as alone with the same speculation.
    assert d.results["c"].token_ids == _alone(gen, PROMPTS[2], sampled, make()).token_ids
    assert sum(r.drafted for r in d.results.values()) > 0
    if method == "draft":  # its own draft: rows verified several tokens per step
        assert d.results["a"].accepted > 0 and len(d.history) < 30


def test_next_chat_turn_reuses_the_previous_turn_and_equals_a_full_prefill(gqa):
    _, gen = gqa
    cache = PrefixCache(64 << 20)
    d = Driver(gen, 2, prefix_cache=cache)
    d.admit(("turn1", PROMPTS[0], _greedy(12)))
    d.drain()
    turn1 = d.results["turn1"].token_ids
    turn2 = PROMPTS[0] + turn1 + [151645, 198, 151644, 872, 198, 40, 1079]
    d.admit(("turn2", turn2, _greedy(15)), ("other", PROMPTS[3], _greedy(15)))  # shares only SYSTEM
    d.drain()
    assert d.results["turn2"].token_ids == _alone(gen, turn2, _greedy(15)).token_ids
    assert d.results["other"].token_ids == _alone(gen, PROMPTS[3], _greedy(15)).token_ids
    # turn 2 copied the whole first exchange but its last token (never fed: the row ended on it); the
    # other prompt copied the shared system prompt.
    assert cache.hits == 2 and cache.reused_tokens == (len(PROMPTS[0]) + len(turn1) - 1) + len(SYSTEM)


def test_prefix_cache_is_lru_and_bounded(gqa):
    _, gen = gqa
    spec = gen.backend.spec
    one = HostKVCache(spec, 1, capacity=20).nbytes
    cache = PrefixCache(max_bytes=2 * one + 1, min_tokens=4)
    row = HostKVCache(spec, 1, capacity=20)
    a, b, c = list(range(1, 21)), list(range(101, 121)), list(range(201, 221))
    for tokens in (a, b):
        cache.insert(tokens, lambda: row.snapshot(0, 20))
    assert len(cache) == 2 and cache.bytes == 2 * one
    assert cache.lookup(a + [7])[1] == 20  # touches a: b is now the least recently used
    cache.insert(c, lambda: row.snapshot(0, 20))
    assert cache.lookup(b + [7]) is None and cache.lookup(a[:10] + [9])[1] == 10 and cache.lookup(c)[1] == 19
    cache.insert(a[:10], lambda: pytest.fail("a prefix of a stored entry is not copied again"))
    cache.insert(c + [5, 6], lambda: row.snapshot(0, 20))  # extends c: c is dropped, not kept twice
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert PrefixCache(one - 1, min_tokens=4).insert(a, lambda: row.snapshot(0, 20)) is None


def test_chunked_prefill_interleaves_with_running_rows_and_equals_prefill_at_once(gqa):
    _, gen = gqa
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(100, 20000, 60)]
    d = Driver(gen, 3, prefill_chunk=12)
    d.admit(("r1", PROMPTS[1], _greedy(40)), ("r2", PROMPTS[2], _greedy(40)))
    d.step(2)
    d.admit(("long", long_prompt, _greedy(10)))
    d.drain()
    prefill_steps = [h for h in d.history if h.get("long", 0) is None]
    # 3 rows share 12 positions per step: 4 prompt tokens a step, 15 steps (the last one ends the prefill),
    # each of which gave r1 and r2 their next token.
    assert len(prefill_steps) == 14
    before = d.history[1]
    for i, h in enumerate(prefill_steps):
        assert h["r1"] == before["r1"] + i + 1 and h["r2"] == before["r2"] + i + 1
    for key, prompt, n in (("r1", PROMPTS[1], 40), ("r2", PROMPTS[2], 40), ("long", long_prompt, 10)):
        assert d.results[key].token_ids == _alone(gen, prompt, _greedy(n)).token_ids, key


def test_everything_at_once_with_speculation_and_a_sampled_row(gqa):
    bundle_dir, gen = gqa
    make = speculator_factory(SpeculativeConfig("prompt-lookup", 3, 2), Bundle.open(bundle_dir), gen)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=40, seed=9, stop_token_ids=(-1,))
    d = Driver(gen, 3, speculator=make(), prefix_cache=PrefixCache(64 << 20), prefill_chunk=6)
    d.admit(("a", PROMPTS[0], _greedy(20)))
    d.step(3)
    d.admit(("b", PROMPTS[3], _greedy(20)), ("c", PROMPTS[0] + [11, 12], sampled))
    d.drain()
    assert d.results["a"].token_ids == _alone(gen, PROMPTS[0], _greedy(20)).token_ids
    assert d.results["b"].token_ids == _alone(gen, PROMPTS[3], _greedy(20)).token_ids
    assert d.results["c"].token_ids == _alone(gen, PROMPTS[0] + [11, 12], sampled, make()).token_ids


def test_speculating_rows_keep_logprobs_penalties_and_grammars(gqa):
    """In-flight rows with the server's per-row features (logprobs, penalties, logit_bias, min_tokens, a
    grammar) speculate and still equal their plain runs alone, logprobs included."""
    bundle_dir, gen = gqa
    make = speculator_factory(SpeculativeConfig("draft", 4, 2, str(bundle_dir)), Bundle.open(bundle_dir), gen)
    hello = gen.tokenizer.encode("hello world, hello world, hello")
    jobs = [("pen", PROMPTS[0], SamplingParams(max_new_tokens=16, presence_penalty=1.0, logit_bias={1879: 3.0},
                                               logprobs=2, stop_token_ids=(-1,))),
            ("ban", PROMPTS[1], SamplingParams(max_new_tokens=14, min_tokens=10, frequency_penalty=0.7)),
            ("gram", hello, SamplingParams(max_new_tokens=18, grammar=Grammar("regex", "(hello|world|, )+"),
                                           logprobs=0))]
    d = Driver(gen, 3, speculator=make(), prefix_cache=PrefixCache(64 << 20), prefill_chunk=6)
    d.admit(jobs[0])
    d.step(2)
    d.admit(*jobs[1:])
    d.drain()
    for key, prompt, params in jobs:
        got, alone = d.results[key], _alone(gen, prompt, params)
        assert (got.token_ids, got.text, got.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason), key
        assert [x.token for x in got.logprobs or ()] == [x.token for x in alone.logprobs or ()], key
        assert [x.logprob for x in got.logprobs or ()] == pytest.approx([x.logprob for x in alone.logprobs or ()],
                                                                        abs=1e-4), key
        assert got.drafted > 0, key
    assert len(d.results["pen"].logprobs) == len(d.results["pen"].token_ids)


def test_dca_prompts_past_l0_are_prefilled_whole_and_equal(tiny_bundle_factory):
    gen = Bundle.open(tiny_bundle_factory("dca")[1]).generator()
    long_prompt = [int(t) for t in np.random.default_rng(1).integers(100, 20000, 40)]  # > L0 = 32
    cache = PrefixCache(64 << 20, min_tokens=4)
    d = Driver(gen, 3, prefix_cache=cache, prefill_chunk=4)
    d.admit(("a", PROMPTS[1], _greedy(12)))
    d.step(2)
    d.admit(("long", long_prompt, _greedy(8)), ("short", PROMPTS[1] + [5, 6], _greedy(8)))
    assert [e.filled for e in d.batch.entries[1:]] == [None, 0]  # only the prompt within L0 is chunked
    d.drain()
    d.admit(("again", long_prompt + [7], _greedy(5)))  # past L0: no reuse
    d.drain()
    for key, prompt, n in (("a", PROMPTS[1], 12), ("long", long_prompt, 8), ("short", PROMPTS[1] + [5, 6], 8),
                           ("again", long_prompt + [7], 5)):
        assert d.results[key].token_ids == _alone(gen, prompt, _greedy(n)).token_ids, key
    # Rows that ended within L0 were stored, the long one was not, and the long prompt reused nothing.
    assert cache.reused_tokens == 0 and len(cache) == 2
