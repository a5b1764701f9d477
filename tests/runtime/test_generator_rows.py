"""Per-row sampling params, per-row cancellation and per-row completion in one padded batch."""

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.generator import Generator
from qwen2edge.runtime.sampling import SamplingParams

PROMPTS = [[9707, 11, 1879], [40, 1079, 264, 1273, 315, 279], [151644, 872, 198, 9707]]


def _gen(tiny_bundle_factory) -> Generator:
    _, bundle_dir = tiny_bundle_factory("gqa")
    return Bundle.open(bundle_dir).generator()


def test_per_row_params_equal_single_requests(tiny_bundle_factory):
    gen = _gen(tiny_bundle_factory)
    rows = [SamplingParams(max_new_tokens=5),
            SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, seed=7),
            SamplingParams(max_new_tokens=9, temperature=1.3, top_p=0.8, seed=123, repetition_penalty=1.2)]
    finished: list[int] = []
    texts = {r: "" for r in range(3)}
    batch, _ = gen.generate(PROMPTS, rows, on_text=lambda r, d: texts.__setitem__(r, texts[r] + d),
                            on_finish=lambda r, res: finished.append(r))
    for r, (prompt, params) in enumerate(zip(PROMPTS, rows)):
        single, _ = gen.generate([prompt], params)
        assert batch[r].token_ids == single[0].token_ids
        assert batch[r].text == single[0].text == texts[r]
        assert len(batch[r].token_ids) <= params.max_new_tokens
    # Each row reports completion once, the shortest first.
    assert sorted(finished) == [0, 1, 2] and finished[0] == 0


def test_should_stop_cancels_only_that_row(tiny_bundle_factory):
    gen = _gen(tiny_bundle_factory)
    params = SamplingParams(max_new_tokens=20, stop_token_ids=(-1,))
    steps = {0: 0}

    def stop(row: int) -> bool:
        if row == 1:
            steps[0] += 1
            return steps[0] > 3  # cancel row 1 after three checks
        return False

    batch, _ = gen.generate(PROMPTS[:2], [params, params], should_stop=stop)
    single, _ = gen.generate([PROMPTS[0]], params)
    assert batch[0].token_ids == single[0].token_ids and len(batch[0].token_ids) == 20
    assert batch[1].finish_reason == "cancelled" and len(batch[1].token_ids) == 3
