"""In-flight batching: rows that join a running batch late, leave it early, are cancelled, or make its cache
grow and shrink all produce exactly what they produce alone (real ONNX Runtime sessions, tiny models)."""

import numpy as np
import pytest

from qwen2edge.errors import InternalError
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.continuous import InFlightBatch
from qwen2edge.runtime.sampling import SamplingParams

PROMPTS = [[151644, 872, 198, 9707, 0, 11, 1879, 30], [40, 1079, 264, 1273, 13], [3838],
           [9707, 11, 1879, 0, 1207, 1079], [40, 40, 40]]


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, stop_token_ids=(-1,))


class Driver:
    """Runs an InFlightBatch, collecting each key's streamed text and result."""

    def __init__(self, gen, slots: int):
        self.gen, self.batch = gen, InFlightBatch(gen, slots)
        self.text: dict = {}
        self.results: dict = {}
        self.cancel: set = set()
        self.widths: list[int] = []

    def admit(self, *items):
        self.batch.admit([(key, self.gen.new_row(PROMPTS[p], params)) for key, p, params in items])

    def step(self, n: int = 1):
        for _ in range(n):
            if len(self.batch):
                self.widths.append(len(self.batch))
            self.batch.step(lambda k, d: self.text.__setitem__(k, self.text.get(k, "") + d),
                            lambda k, r: self.results.__setitem__(k, r), lambda k: k in self.cancel)

    def drain(self):
        while len(self.batch):
            self.step()


def _alone(gen, p: int, params: SamplingParams):
    return gen.generate([PROMPTS[p]], params)[0][0]


@pytest.fixture(scope="module")
def gqa(tiny_bundle_factory):
    return Bundle.open(tiny_bundle_factory("gqa")[1]).generator()


@pytest.fixture(scope="module")
def gqa8(tiny_bundle_factory):
    """The same model with 8-slot cache buckets, so its cache grows and shrinks within 96 slots."""
    return Bundle.open(tiny_bundle_factory("gqa")[1]).generator(cache_bucket=8)


def test_rows_joining_and_leaving_equal_their_single_runs(gqa):
    sampled = SamplingParams(max_new_tokens=14, temperature=0.9, top_p=0.9, seed=7, stop_token_ids=(-1,))
    d = Driver(gqa, slots=4)
    d.admit(("a", 0, _greedy(30)), ("b", 1, _greedy(4)))
    d.step(3)
    d.admit(("c", 2, sampled))  # joins a running batch
    d.step(5)  # b finished meanwhile: c moved into its row
    d.admit(("d", 3, _greedy(9)), ("e", 4, _greedy(20)))
    d.drain()
    want = {"a": (0, _greedy(30)), "b": (1, _greedy(4)), "c": (2, sampled), "d": (3, _greedy(9)), "e": (4, _greedy(20))}
    for key, (p, params) in want.items():
        alone = _alone(gqa, p, params)
        assert d.results[key].token_ids == alone.token_ids, key
        assert d.results[key].text == alone.text == d.text.get(key, ""), key  # streamed == result == alone
        assert d.results[key].finish_reason == "length"
    assert max(d.widths) == 4 and min(d.widths) == 1  # it really ran 4 rows at once, and shrank
    assert d.batch.cache is None  # idle: the cache is released


def test_cancelled_row_leaves_and_the_others_are_unaffected(gqa):
    d = Driver(gqa, slots=3)
    d.admit(("x", 0, _greedy(20)), ("y", 1, _greedy(20)), ("z", 2, _greedy(20)))
    d.step(4)
    d.cancel.add("x")  # row 0: its hole is filled by the last row
    d.drain()
    assert d.results["x"].finish_reason == "cancelled" and len(d.results["x"].token_ids) < 20
    for key, p in (("y", 1), ("z", 2)):
        assert d.results[key].token_ids == _alone(gqa, p, _greedy(20)).token_ids, key


def test_stop_strings_and_stop_ids_end_rows_as_alone(gqa):
    first = _alone(gqa, 0, _greedy(12))
    stop_id = SamplingParams(max_new_tokens=12, stop_token_ids=(first.token_ids[5],))
    stop_text = SamplingParams(max_new_tokens=12, stop_token_ids=(-1,), stop_strings=(first.text[len(first.text) // 2:][:3],))
    d = Driver(gqa, slots=3)
    d.admit(("id", 0, stop_id), ("text", 0, stop_text), ("plain", 1, _greedy(12)))
    d.drain()
    for key, params, p in (("id", stop_id, 0), ("text", stop_text, 0), ("plain", _greedy(12), 1)):
        alone = _alone(gqa, p, params)
        assert (d.results[key].token_ids, d.results[key].text, d.results[key].finish_reason) == \
            (alone.token_ids, alone.text, alone.finish_reason), key
    assert d.results["id"].finish_reason == d.results["text"].finish_reason == "stop"


def test_cache_grows_for_a_long_row_and_shrinks_after_it(gqa8):
    gqa = gqa8
    d = Driver(gqa, slots=2)
    d.admit(("long", 0, _greedy(70)), ("short", 2, _greedy(80)))
    caps = []
    while "long" not in d.results:
        d.step()
        caps.append(d.batch.cache.capacity)
    assert max(caps) == 96  # grew to the bundle's max_seq_len for the 8 + 70-token row
    d.drain()
    assert d.results["long"].token_ids == _alone(gqa, 0, _greedy(70)).token_ids
    assert d.results["short"].token_ids == _alone(gqa, 2, _greedy(80)).token_ids


def test_shrinks_when_the_long_rows_are_gone(gqa8):
    gqa = gqa8
    d = Driver(gqa, slots=2)
    d.admit(("long", 0, _greedy(60)))
    d.step(58)
    d.admit(("new", 2, _greedy(6)))  # 1-token prompt joining a 64+-slot cache
    d.step(3)  # long ends; new alone needs only a few slots
    assert "long" in d.results and d.batch.cache.capacity <= 16, d.batch.cache.capacity
    d.drain()
    assert d.results["new"].token_ids == _alone(gqa, 2, _greedy(6)).token_ids


def test_dca_rows_in_flight_equal_their_single_runs(tiny_bundle_factory):
    gen = Bundle.open(tiny_bundle_factory("dca")[1]).generator()
    d = Driver(gen, slots=3)
    d.admit(("a", 0, _greedy(40)))
    d.step(7)
    d.admit(("b", 3, _greedy(30)), ("c", 1, _greedy(10)))
    d.drain()
    for key, p, n in (("a", 0, 40), ("b", 3, 30), ("c", 1, 10)):
        assert d.results[key].token_ids == _alone(gen, p, _greedy(n)).token_ids, key


def test_admitting_more_rows_than_free_slots_is_refused(gqa):
    batch = InFlightBatch(gqa, 1)
    rows = [(k, gqa.new_row(PROMPTS[0], _greedy(2))) for k in "ab"]
    with pytest.raises(InternalError, match="free slots"):
        batch.admit(rows)
    assert len(batch) == 0 and np.isscalar(batch.free) and batch.free == 1
