"""The official `openai` client against a real server: logprobs and echo (equal to transformers' log-softmax),
several prompts and choices, best_of, OpenAI penalties, logit_bias, min_tokens and ignore_eos."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.sampling import SamplingParams

from .conftest import API_KEY

TOL = 2e-3
TEXT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny_bundle_factory):
    """The served bundle run in-process, and transformers' model it came from."""
    model_dir, bundle_dir = tiny_bundle_factory("gqa")
    bundle = Bundle.open(bundle_dir)
    return bundle, bundle.generator(), model_dir


def _log_softmax(hf_reference_factory, model_dir, ids: list[int]) -> np.ndarray:
    import torch

    logits = hf_reference_factory(model_dir).logits(ids)
    return torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).numpy()


def _greedy_ids(local, prompt: list[int], n: int, **kw) -> list[int]:
    return local[1].generate([prompt], SamplingParams(max_new_tokens=n, **kw))[0][0].token_ids


def _joined(chunks, key: str) -> list:
    return [x for c in chunks if c.choices and c.choices[0].logprobs for x in getattr(c.choices[0].logprobs, key)]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_and_generated_logprobs_equal_transformers(tiny_server, client, local, hf_reference_factory, stream):
    bundle, _, model_dir = local
    prompt = bundle.tokenizer.encode(TEXT)
    kw = dict(model=tiny_server.model, prompt=prompt, echo=True, logprobs=3, max_tokens=5, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    lp = whole.logprobs
    if stream:
        chunks = list(client.completions.create(**kw, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == whole.text
        assert _joined(chunks, "tokens") == lp.tokens and _joined(chunks, "text_offset") == lp.text_offset
        assert _joined(chunks, "token_logprobs") == lp.token_logprobs
        assert len([c for c in chunks if c.choices[0].logprobs and c.choices[0].logprobs.tokens]) >= 3  # per token
    full = prompt + _greedy_ids(local, prompt, 5)
    ref = _log_softmax(hf_reference_factory, model_dir, full)
    assert len(lp.tokens) == len(full) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(full)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, full[i]]) < TOL
        best = sorted(lp.top_logprobs[i].values(), reverse=True)[:3]  # plus the chosen token when not among them
        assert np.allclose(best, np.sort(ref[i - 1])[::-1][:3], atol=TOL)
        assert lp.tokens[i] in lp.top_logprobs[i]
    assert "".join(lp.tokens) == whole.text == TEXT + whole.text[len(TEXT):]
    assert all(whole.text[off:].startswith(tok) for off, tok in zip(lp.text_offset, lp.tokens))


def test_scoring_only_requests(tiny_server, client, local, hf_reference_factory):
    """What an evaluation harness sends: token-id prompts, echo, max_tokens 0, logprobs."""
    bundle, _, model_dir = local
    prompts = [bundle.tokenizer.encode(TEXT), bundle.tokenizer.encode("Hello world, again")]
    out = client.completions.create(model=tiny_server.model, prompt=prompts, echo=True, logprobs=1, max_tokens=0)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 0
    assert out.usage.prompt_tokens == sum(map(len, prompts))
    for choice, ids in zip(out.choices, prompts):
        assert choice.text == bundle.tokenizer.decode(ids) and choice.finish_reason == "length"
        ref = _log_softmax(hf_reference_factory, model_dir, ids)
        got = np.array(choice.logprobs.token_logprobs[1:])
        assert np.abs(got - ref[np.arange(len(ids) - 1), ids[1:]]).max() < TOL
    chunks = list(client.completions.create(model=tiny_server.model, prompt=prompts, echo=True, logprobs=1,
                                            max_tokens=0, stream=True))
    for choice in out.choices:
        mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == "length"
        assert _joined([c for c in chunks if c.choices[0].index == choice.index], "token_logprobs") == \
            choice.logprobs.token_logprobs


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs(tiny_server, client, local, hf_reference_factory, stream):
    bundle, _, model_dir = local
    messages = [{"role": "user", "content": "Name a color."}]
    kw = dict(model=tiny_server.model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0]
    entries = whole.logprobs.content
    if stream:
        chunks = list(client.chat.completions.create(**kw, stream=True))
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    prompt = bundle.tokenizer.encode(bundle.tokenizer.apply_chat_template(messages))
    gen_ids = _greedy_ids(local, prompt, 6)
    ref = _log_softmax(hf_reference_factory, model_dir, prompt + gen_ids)
    assert len(entries) == len(gen_ids)
    for i, (e, tid) in enumerate(zip(entries, gen_ids)):
        row = ref[len(prompt) - 1 + i]
        assert abs(e.logprob - row[tid]) < TOL and bytes(e.bytes) == bundle.tokenizer.token_bytes(tid)
        assert len(e.top_logprobs) == 2 and np.allclose([t.logprob for t in e.top_logprobs], np.sort(row)[::-1][:2],
                                                        atol=TOL)
    assert b"".join(bytes(e.bytes) for e in entries).decode() == whole.message.content
    plain = client.chat.completions.create(model=tiny_server.model, messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_n_greedy_choices_are_identical(tiny_server, client, stream):
    kw = dict(model=tiny_server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, n=3)
    if stream:
        texts = {}
        for c in client.chat.completions.create(**kw, stream=True):
            for ch in c.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        assert sorted(texts) == [0, 1, 2] and len(set(texts.values())) == 1
        return
    out = client.chat.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.message.content for c in out.choices}) == 1 and out.choices[0].message.content


def test_several_prompts_equal_single_requests(tiny_server, client, local):
    prompts = ["Once upon a time", "The capital of France", "def add(a, b):", "Hello"]
    kw = dict(model=tiny_server.model, max_tokens=8, temperature=0)
    batched = client.completions.create(prompt=prompts, **kw)
    singles = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert [c.index for c in batched.choices] == [0, 1, 2, 3]
    assert [c.text for c in batched.choices] == singles
    ids = [local[0].tokenizer.encode(p) for p in prompts]
    assert [c.text for c in client.completions.create(prompt=ids, **kw).choices] == singles


def test_seeded_choices_are_reproducible_one_by_one(tiny_server, client):
    """Choice i of every prompt samples with seed + i: it equals a single request with that seed."""
    prompts = ["Random words:", "A list of fruit:"]
    kw = dict(model=tiny_server.model, max_tokens=8, temperature=1.0)
    out = client.completions.create(prompt=prompts, n=2, seed=40, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        for i in range(2):
            single = client.completions.create(prompt=prompt, seed=40 + i, **kw).choices[0].text
            assert out.choices[p * 2 + i].text == single
    assert out.choices[0].text != out.choices[1].text


def test_best_of_returns_the_most_likely_candidates(tiny_server, client):
    kw = dict(model=tiny_server.model, prompt="Random words:", max_tokens=6, temperature=1.3)
    out = client.completions.create(best_of=4, n=2, seed=7, **kw)
    candidates = []
    for i in range(4):
        c = client.completions.create(seed=7 + i, logprobs=0, **kw).choices[0]
        candidates.append((np.mean(c.logprobs.token_logprobs), c.text))
    best = [text for _, text in sorted(candidates, reverse=True)[:2]]
    assert [c.text for c in out.choices] == best and [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].logprobs is None  # ranked with logprobs, shown only when asked
    assert out.usage.completion_tokens == 4 * 6  # every candidate was generated


def test_penalties_and_bias_reach_the_sampler(tiny_server, client, local):
    bundle, gen, _ = local
    prompt = "Tell me a story"
    ids = bundle.tokenizer.encode(prompt)
    token = bundle.tokenizer.encode(" the")[0]
    kw = dict(model=tiny_server.model, prompt=prompt, max_tokens=8, temperature=0)
    forced = client.completions.create(logit_bias={str(token): 100}, **kw)
    assert forced.choices[0].text == " the" * 8
    penalised = client.completions.create(logit_bias={str(token): 12}, presence_penalty=1.5, frequency_penalty=2.0,
                                          **kw).choices[0].text
    ref = gen.generate([ids], SamplingParams(max_new_tokens=8, logit_bias={token: 12}, presence_penalty=1.5,
                                             frequency_penalty=2.0))[0][0]
    assert penalised == ref.text and 1 <= ref.token_ids.count(token) < 8


def test_min_tokens_and_ignore_eos(tiny_server, client, local):
    eos = local[1].default_stop_ids[0]
    kw = dict(model=tiny_server.model, prompt="Hi", max_tokens=6, temperature=0, logit_bias={str(eos): 100})
    assert client.completions.create(**kw).usage.completion_tokens == 0
    late = client.completions.create(**kw, extra_body={"min_tokens": 3})
    assert late.usage.completion_tokens == 3 and late.choices[0].finish_reason == "stop"
    endless = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert endless.usage.completion_tokens == 6 and endless.choices[0].finish_reason == "length"
