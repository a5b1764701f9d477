"""Speculative decoding on real ONNX Runtime sessions of tiny models: greedy output equal to plain decoding
token for token (prompt lookup, a smaller random draft, the model as its own draft; plain RoPE, YaRN, DCA;
padded batches), stops inside accepted runs, the fallback on low acceptance, and sampled output that
follows the target's distribution (chi-square over thousands of seeded rows on a 4-token vocabulary)."""

import json
import math
import re

import numpy as np
import pytest

from qwen2edge.errors import InputError
from qwen2edge.runtime import speculative
from qwen2edge.runtime.bundle import Bundle
from qwen2edge.runtime.constrain import Grammar
from qwen2edge.runtime.sampling import SamplingParams, probabilities
from qwen2edge.runtime.speculative import SpeculativeConfig, rejection_step, speculator_factory

from ..test_cli import assert_one_line_error, run_cli

# Right-padded batch; the first and last repeat themselves, so prompt lookup finds n-grams to copy.
PROMPTS = [[9707, 11, 1879, 0, 9707, 11, 1879, 0, 9707], [40, 1079, 264, 1273, 13], [3838, 25, 3838, 25, 3838, 25]]
GREEDY = SamplingParams(max_new_tokens=24, stop_token_ids=(-1,))


def _export(tiny_model_factory, tmp_path_factory, name, max_seq_len=96, **kwargs):
    from qwen2edge.exporter.export import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp(name) / "bundle"
    export_bundle(tiny_model_factory(name, **kwargs), out, ExportOptions(max_seq_len=max_seq_len, dtype="fp32"))
    return out


@pytest.fixture(scope="module")
def small_draft(tiny_model_factory, tmp_path_factory):
    """A smaller random model with the Qwen tokenizer: a draft whose guesses the targets mostly reject."""
    return _export(tiny_model_factory, tmp_path_factory, "spec_draft", num_layers=1, hidden_size=32, num_heads=2,
                   num_kv_heads=1, intermediate_size=48, seed=5)


_FACTORIES: dict = {}


def _speculator(bundle_dir, gen, method, draft=None, k=4, ngram=2):
    """A fresh speculator; the factory (and a draft's session) is built once per configuration."""
    key = (str(bundle_dir), id(gen), method, str(draft), k, ngram)
    if key not in _FACTORIES:
        config = SpeculativeConfig(method, k, ngram, draft and str(draft))
        _FACTORIES[key] = speculator_factory(config, Bundle.open(bundle_dir), gen)
    return _FACTORIES[key]()


@pytest.fixture(scope="module")
def generators(tiny_bundle_factory):
    cache = {}

    def get(variant):
        if variant not in cache:
            bundle_dir = tiny_bundle_factory(variant)[1]
            cache[variant] = (bundle_dir, Bundle.open(bundle_dir).generator())
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["gqa", "yarn", "dca"])
def test_greedy_output_equals_plain_for_every_proposer(variant, generators, small_draft):
    bundle_dir, gen = generators(variant)
    penalized = SamplingParams(max_new_tokens=20, repetition_penalty=1.3, stop_token_ids=(-1,))
    per_row = [GREEDY, penalized, GREEDY]  # per-row samplers; gqa also runs one shared sampler
    proposers = [("prompt-lookup", None), ("draft", bundle_dir)] + ([("draft", small_draft)] if variant == "gqa" else [])
    for params in ((GREEDY, per_row) if variant == "gqa" else (per_row,)):
        plain, _ = gen.generate(PROMPTS, params)
        for method, draft in proposers:
            got, timings = gen.generate(PROMPTS, params, speculator=_speculator(bundle_dir, gen, method, draft))
            for a, b in zip(plain, got):
                assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason), (method, draft)
            assert timings.decode_tokens == max(len(r.token_ids) for r in got) - 1
            if draft == bundle_dir:  # its own draft: drafts are accepted (the draft knows no penalty)
                own = [(r, p) for r, p, q in zip(got, PROMPTS, [params] * 3 if params is GREEDY else params)
                       if q is GREEDY]
                assert all(r.accepted == r.drafted > 0 for r, _ in own)
                assert timings.decode_steps < timings.decode_tokens
                if variant == "dca":  # the temperature (L0 = 32) makes multi-token steps inexact past 32 slots
                    assert all(r.drafted < 32 - len(p) for r, p in own)


def _same(a, b, why) -> None:
    """Token for token, and the same log-probabilities (a verify step's logits may differ in the last bits)."""
    assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason), why
    if a.logprobs is None:
        assert b.logprobs is None, why
        return
    assert [(x.token, [t for t, _ in x.top]) for x in b.logprobs] == [(x.token, [t for t, _ in x.top])
                                                                      for x in a.logprobs], why
    assert [x.logprob for x in b.logprobs] == pytest.approx([x.logprob for x in a.logprobs], abs=1e-4), why


def test_greedy_rows_with_penalties_bias_bans_logprobs_and_a_grammar_equal_plain(generators):
    """Drafts are checked through each row's own logits chain, so OpenAI penalties, logit_bias, min_tokens,
    logprobs and grammars hold exactly; the model as its own draft proposes the unprocessed argmax, so the
    chain really rejects some drafts."""
    bundle_dir, gen = generators("gqa")
    grammar = Grammar("regex", "(hello|world|, | there)+")
    rows = [
        SamplingParams(max_new_tokens=20, presence_penalty=0.8, frequency_penalty=0.5, logit_bias={1879: 4.0},
                       stop_token_ids=(-1,)),
        SamplingParams(max_new_tokens=20, min_tokens=12, logprobs=3),
        SamplingParams(max_new_tokens=24, grammar=grammar, logprobs=1),
    ]
    prompts = [PROMPTS[0], PROMPTS[1], gen.tokenizer.encode("hello world, hello world, hello")]
    plain, _ = gen.generate(prompts, rows)
    assert re.fullmatch("[helowrdt ,]+", plain[2].text)  # the grammar held (max_new_tokens may cut a word)
    for method, draft in (("prompt-lookup", None), ("draft", bundle_dir)):
        got, _ = gen.generate(prompts, rows, speculator=_speculator(bundle_dir, gen, method, draft))
        for a, b, why in zip(plain, got, ("penalties", "min_tokens+logprobs", "grammar")):
            _same(a, b, (method, why))
        assert all(r.drafted > 0 for r in got) if method == "draft" else sum(r.drafted for r in got) > 0, \
            [(r.drafted, r.accepted) for r in got]
        if method == "draft":
            assert got[0].accepted < got[0].drafted  # the penalties turned some of the draft's picks down


def test_stop_id_and_stop_string_inside_an_accepted_run(generators):
    bundle_dir, gen = generators("gqa")
    first = gen.generate([PROMPTS[1]], GREEDY)[0][0]
    by_id = SamplingParams(max_new_tokens=40, stop_token_ids=(first.token_ids[7],))
    by_text = SamplingParams(max_new_tokens=40, stop_token_ids=(-1,), stop_strings=(first.text[12:15],))
    for params in (by_id, by_text):
        plain = gen.generate([PROMPTS[1]], params)[0][0]
        spec = gen.generate([PROMPTS[1]], params, speculator=_speculator(bundle_dir, gen, "draft", bundle_dir, k=6))[0][0]
        assert plain.finish_reason == spec.finish_reason == "stop"
        assert (spec.token_ids, spec.text) == (plain.token_ids, plain.text)
        assert spec.drafted >= 6  # the stop came inside a verified run of drafts


def test_low_acceptance_falls_back_to_plain_decoding(generators, small_draft):
    bundle_dir, gen = generators("gqa")
    params = SamplingParams(max_new_tokens=80, stop_token_ids=(-1,))
    got = gen.generate([PROMPTS[1]], params, speculator=_speculator(bundle_dir, gen, "draft", small_draft))[0][0]
    assert got.accepted <= got.drafted // 4  # the random draft is mostly wrong
    # Windows of 4 poor verify steps, then 8, 16, 32 plain steps: 16 verify steps at most, not 79.
    assert 0 < got.drafted <= 16 * 4
    assert got.token_ids == gen.generate([PROMPTS[1]], params)[0][0].token_ids


def test_sampled_runs_are_reproducible_with_a_seed(generators):
    bundle_dir, gen = generators("gqa")
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=11, stop_token_ids=(-1,))
    runs = [gen.generate(PROMPTS, params, speculator=_speculator(bundle_dir, gen, "draft", bundle_dir))[0]
            for _ in range(2)]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    assert all(r.drafted > 0 and r.accepted > 0 for r in runs[0])


# ---- the rejection step follows the target distribution ----------------------------------------------

def chi2_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 is the 0.999 normal quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells expecting >= 5 draws (the rest pooled into one) and its dof."""
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("q", [None, [0.1, 0.6, 0.05, 0.2, 0.05]], ids=["one-hot", "draft-q"])
def test_rejection_step_draws_from_the_target(q):
    p = np.array([0.3, 0.1, 0.25, 0.15, 0.2])
    q = None if q is None else np.array(q)
    rng = np.random.default_rng(0)
    n, counts = 40000, np.zeros(5)
    for _ in range(n):
        d = 1 if q is None else int(rng.choice(5, p=q))  # one-hot proposals always propose token 1
        out = rejection_step(p, q, d, rng)
        counts[d if out is None else out] += 1
    stat, dof = chi2(counts, n * p)
    assert stat < chi2_critical(dof), (counts / n, p)


VOCAB4_IDS = dict(bos_token_id=0, pad_token_id=0, eos_token_id=[3])
PROMPT4 = [1, 2, 0, 1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def vocab4(tiny_model_factory, tmp_path_factory):
    """A target and a draft over a 4-token vocabulary, so 3-token continuations have 64 outcomes."""
    target = _export(tiny_model_factory, tmp_path_factory, "vocab4", 32, vocab_size=4, seed=1,
                     extra_config=VOCAB4_IDS)
    draft = _export(tiny_model_factory, tmp_path_factory, "vocab4_draft", 32, vocab_size=4, seed=2, num_layers=1,
                    extra_config=VOCAB4_IDS)
    return target, draft


def _exact_joint(gen, params) -> np.ndarray:
    """P(t1, t2, t3 | PROMPT4) from plain prefills of every context."""
    def dist(ctx):
        return probabilities(gen.prefill(gen.new_cache(1, len(ctx)), [ctx]), params)[0]

    joint = np.zeros((4, 4, 4))
    p1 = dist(PROMPT4)
    for a in range(4):
        p2 = dist(PROMPT4 + [a])
        for b in range(4):
            joint[a, b] = p1[a] * p2[b] * dist(PROMPT4 + [a, b])
    return joint.reshape(-1)


def _sampled_joint(gen, speculator_of, params, rows: int, batches: int) -> tuple[np.ndarray, int]:
    counts, drafted = np.zeros(64), 0
    for b in range(batches):
        plist = [SamplingParams(**{**params.__dict__, "seed": b * rows + r}) for r in range(rows)]
        results, _ = gen.generate([PROMPT4] * rows, plist, speculator=speculator_of())
        for r in results:
            t = r.token_ids
            counts[t[0] * 16 + t[1] * 4 + t[2]] += 1
            drafted += r.drafted
    return counts, drafted


@pytest.mark.parametrize("method", ["prompt-lookup", "draft"])
def test_sampled_output_follows_the_target_distribution(method, vocab4, monkeypatch):
    target, draft = vocab4
    gen = Bundle.open(target).generator()
    # 4 new tokens: the first verify step checks 2 drafts (tokens 2 and 3), whose joint law is tested.
    params = SamplingParams(max_new_tokens=4, temperature=0.9, top_k=3, stop_token_ids=(-1,))
    expected = _exact_joint(gen, params) * 2400
    make = speculator_factory(SpeculativeConfig(method, 2, 1, str(draft) if method == "draft" else None),
                              Bundle.open(target), gen)
    counts, drafted = _sampled_joint(gen, make, params, rows=400, batches=6)
    stat, dof = chi2(counts, expected)
    assert drafted >= 2 * 2400  # every row verified drafts for tokens 2 and 3
    assert stat < chi2_critical(dof), stat

    # The check has teeth: replacing a rejected draft with a plain draw from p (instead of max(p - q, 0))
    # over-weights drafted tokens, and the same statistic rejects it.
    def wrong(p, q, d, rng):
        qd = 1.0 if q is None else float(q[d])
        return None if rng.random() * qd < p[d] else int(rng.choice(len(p), p=p / p.sum()))

    monkeypatch.setattr(speculative, "rejection_step", wrong)
    counts, _ = _sampled_joint(gen, make, params, rows=400, batches=6)
    assert chi2(counts, expected)[0] > chi2_critical(dof)


def test_sampled_output_with_penalties_bias_and_bans_follows_the_processed_distribution(vocab4):
    """Rejection sampling against the row's processed distribution: presence/frequency penalties (which
    change with every accepted token), logit_bias and min_tokens' ban on the stop id."""
    target, draft = vocab4
    gen = Bundle.open(target).generator()
    params = SamplingParams(max_new_tokens=4, temperature=0.9, presence_penalty=1.0, frequency_penalty=0.5,
                            logit_bias={2: 0.7}, min_tokens=3, stop_token_ids=(3,))

    def dist(generated):
        row = gen.new_row(PROMPT4, params)
        for tok in generated:
            row.accept(tok, None)
        return probabilities(row.scores(gen.prefill(gen.new_cache(1, 16), [PROMPT4 + generated])), params)[0]

    joint = np.zeros((4, 4, 4))
    p1 = dist([])
    for a in range(4):
        p2 = dist([a])
        for b in range(4):
            joint[a, b] = p1[a] * p2[b] * dist([a, b])
    assert joint[3].sum() == joint[:, 3].sum() == joint[:, :, 3].sum() == 0  # the ban holds in the law itself
    expected = joint.reshape(-1) * 2400
    make = speculator_factory(SpeculativeConfig("draft", 2, 1, str(draft)), Bundle.open(target), gen)
    counts, drafted = _sampled_joint(gen, make, params, rows=400, batches=6)
    stat, dof = chi2(counts, expected)
    assert drafted >= 2 * 2400
    assert stat < chi2_critical(dof), stat
    # Teeth: the same draws scored against the unprocessed law are rejected.
    assert chi2(counts, _exact_joint(gen, params) * 2400)[0] > chi2_critical(dof)


# ---- command line ---------------------------------------------------------------------------------

def test_generate_json_reports_speculation(tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    ids = ",".join(map(str, PROMPTS[0]))
    proc = run_cli("generate", str(bundle), "--prompt-ids", ids, "--max-new-tokens", "30", "--json",
                   "--speculative", "prompt-lookup", "--num-speculative-tokens", "3", "--ngram", "2", block_torch=True)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    plain = Bundle.open(bundle).generator().generate([PROMPTS[0]], SamplingParams(max_new_tokens=30))[0][0]
    assert out["token_ids"] == plain.token_ids
    spec = out["speculative"]
    assert spec["method"] == "prompt-lookup" and spec["drafted"] >= spec["accepted"] >= 0 and spec["drafted"] > 0
    assert out["timings"]["decode_tokens_per_s"] > 0


def test_a_draft_with_another_vocabulary_is_refused_in_one_line(tiny_bundle_factory, vocab4):
    _, bundle = tiny_bundle_factory("gqa")
    proc = run_cli("generate", str(bundle), "--prompt-ids", "1,2", "--draft", str(vocab4[1]))
    assert_one_line_error(proc, InputError.exit_code, "does not share the target's vocabulary")
    assert "--draft" in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["--speculative", "draft"], "pass --draft DRAFT_BUNDLE"),
    (["--speculative", "prompt-lookup", "--num-speculative-tokens", "0"], "--num-speculative-tokens must be"),
    (["--speculative", "prompt-lookup", "--ngram", "0"], "--ngram must be"),
])
def test_bad_speculative_options_are_one_line_errors(args, needle, tiny_bundle_factory):
    _, bundle = tiny_bundle_factory("gqa")
    assert_one_line_error(run_cli("generate", str(bundle), "--prompt-ids", "1,2", *args), InputError.exit_code, needle)


def test_config_refuses_a_draft_with_prompt_lookup():
    with pytest.raises(InputError, match="drop one of"):
        SpeculativeConfig("prompt-lookup", draft="x").check()
