"""Each logits transform on a 10-token vocabulary against hand-computed values,
transformers' RepetitionPenaltyLogitsProcessor and the OpenAI penalty formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmgen.sampling.logits import (
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    token_counts,
    token_mask,
)

INF = float("inf")
V = 10
# one row, hand-picked: distinct values, some negative, one zero
ROW = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0, -0.5, 2.5, -3.0]


def row(values=ROW) -> torch.Tensor:
    return torch.tensor([values], dtype=torch.float32)


def rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, V), generator=g) * 2


# ------------------------------------------------------------------ helpers


def test_token_counts_and_mask():
    counts = token_counts([[1, 1, 3], [], [9, 0, 9, 9], [42, -1, 2]], V)
    assert counts.shape == (4, V)
    assert counts[0].tolist() == [0, 2, 0, 1, 0, 0, 0, 0, 0, 0]
    assert counts[1].tolist() == [0] * V
    assert counts[2].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 0, 3]
    assert counts[3].tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]  # out-of-range ids ignored
    assert token_mask([[1, 1, 3]], V)[0].tolist() == [c > 0 for c in [0, 2, 0, 1, 0, 0, 0, 0, 0, 0]]


# -------------------------------------------------------- repetition penalty


def test_repetition_penalty_by_hand():
    seen = token_mask([[0, 1, 5, 3]], V)
    out = apply_repetition_penalty(row(), seen, torch.tensor([2.0]))
    expected = list(ROW)
    expected[0] = 2.0 / 2  # positive: divided
    expected[1] = -1.0 * 2  # negative: multiplied
    expected[5] = 0.0 / 2  # zero: divided (stays 0)
    expected[3] = 3.0 / 2
    assert out[0].tolist() == expected


def test_repetition_penalty_equals_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = rows(3, seed=1)
    histories = [[0, 4, 4, 7, 2], [9, 1], [3, 3, 3, 8, 0, 6, 5]]
    for penalty in (0.5, 1.3, 2.0):
        hf = torch.cat(
            [
                RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([h]), logits[i : i + 1].clone())
                for i, h in enumerate(histories)
            ]
        )
        ours = apply_repetition_penalty(logits, token_mask(histories, V), torch.full((3,), penalty))
        assert torch.equal(ours, hf)


def test_repetition_penalty_off_rows_unchanged():
    logits = rows(2)
    seen = torch.ones((2, V), dtype=torch.bool)
    out = apply_repetition_penalty(logits, seen, torch.tensor([1.0, 1.5]))
    assert torch.equal(out[0], logits[0])
    assert not torch.equal(out[1], logits[1])


# ------------------------------------------------- presence / frequency (OpenAI)


def openai_penalties(mu, output_tokens, presence, frequency):
    """The OpenAI formula, written directly from the docs:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence"""
    out = list(mu)
    for j in range(len(mu)):
        c = output_tokens.count(j)
        out[j] = mu[j] - c * frequency - float(c > 0) * presence
    return out


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 0.7), (1.5, -0.3), (-2.0, 2.0)])
def test_presence_frequency_equals_openai_formula(presence, frequency):
    output = [3, 3, 3, 0, 8, 8, 1]
    out = apply_presence_frequency_penalties(
        row(), token_counts([output], V), torch.tensor([presence]), torch.tensor([frequency])
    )
    expected = openai_penalties(ROW, output, presence, frequency)
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_presence_frequency_by_hand():
    out = apply_presence_frequency_penalties(
        row(), token_counts([[3, 3, 3]], V), torch.tensor([0.5]), torch.tensor([0.25])
    )
    expected = list(ROW)
    expected[3] = 3.0 - 0.5 - 3 * 0.25  # 1.75
    assert out[0].tolist() == expected


def test_presence_frequency_off_rows_unchanged():
    logits = rows(3)
    counts = token_counts([[1, 2, 2], [1, 2, 2], [1, 2, 2]], V)
    out = apply_presence_frequency_penalties(
        logits, counts, torch.tensor([0.0, 0.3, 0.0]), torch.tensor([0.0, 0.0, 0.4])
    )
    assert torch.equal(out[0], logits[0])
    assert out[1, 2] == pytest.approx(float(logits[1, 2]) - 0.3)
    assert out[2, 2] == pytest.approx(float(logits[2, 2]) - 0.8)


# ---------------------------------------------------------------- logit bias


def test_logit_bias():
    bias = torch.zeros((2, V))
    bias[0, 4] = 10.0
    bias[0, 3] = -100.0
    logits = torch.cat([row(), row()])
    out = apply_logit_bias(logits, bias)
    expected = list(ROW)
    expected[4] = -2.0 + 10.0
    expected[3] = 3.0 - 100.0
    assert out[0].tolist() == expected
    assert torch.equal(out[1], logits[1])


# --------------------------------------------------------------- min_tokens


def test_min_tokens_suppression():
    suppress = torch.zeros((2, V), dtype=torch.bool)
    suppress[0, [3, 8]] = True
    logits = torch.cat([row(), row()])
    out = apply_min_tokens(logits, suppress)
    expected = list(ROW)
    expected[3] = expected[8] = -INF
    assert out[0].tolist() == expected
    assert torch.equal(out[1], logits[1])


# --------------------------------------------------------------- temperature


def test_temperature():
    logits = torch.cat([row(), row(), row(), row()])
    out = apply_temperature(logits, torch.tensor([0.5, 2.0, 1.0, 0.0]))
    assert out[0].tolist() == [x * 2 for x in ROW]
    assert out[1].tolist() == [x / 2 for x in ROW]
    assert torch.equal(out[2], logits[2])  # 1.0: off
    assert torch.equal(out[3], logits[3])  # 0.0: greedy row, left alone
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------- top-k


def test_top_k_by_hand():
    out = apply_top_k(row(), torch.tensor([3]))
    # three largest: 3.0 (id 3), 2.5 (id 8), 2.0 (id 0)
    expected = [x if i in (3, 8, 0) else -INF for i, x in enumerate(ROW)]
    assert out[0].tolist() == expected


def test_top_k_keeps_ties_and_off_values():
    tied = [1.0, 3.0, 2.0, 2.0, 0.0, 2.0, -1.0, 0.5, 0.0, 0.0]
    out = apply_top_k(row(tied), torch.tensor([2]))
    # 2nd largest is 2.0, shared by ids 2, 3, 5: all kept
    assert [i for i, x in enumerate(out[0].tolist()) if x != -INF] == [1, 2, 3, 5]
    logits = rows(4)
    out = apply_top_k(logits, torch.tensor([0, -1, V, 1]))
    assert torch.equal(out[:3], logits[:3])
    assert (out[3] != -INF).sum() == 1 and out[3].argmax() == logits[3].argmax()


# ---------------------------------------------------------------------- top-p


def np_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_p_by_hand():
    p = np_softmax(ROW)
    order = np.argsort(-np.asarray(ROW), kind="stable")
    # cumulative probabilities in rank order: ids 3, 8, 0, 6, 2, 5, ...
    cum = np.cumsum(p[order])
    assert cum[1] < 0.8 < cum[2]  # the first three tokens reach 0.8
    out = apply_top_p(row(), torch.tensor([0.8]))
    assert [i for i, x in enumerate(out[0].tolist()) if x != -INF] == [0, 3, 8]
    assert out[0, [0, 3, 8]].tolist() == [2.0, 3.0, 2.5]  # kept values unchanged
    # exactly at a boundary: p = mass of the top 2 keeps exactly those 2
    boundary = float(np.float32(cum[1])) - 1e-6
    out = apply_top_p(row(), torch.tensor([boundary]))
    assert [i for i, x in enumerate(out[0].tolist()) if x != -INF] == [3, 8]


def test_top_p_always_keeps_one_token():
    out = apply_top_p(row(), torch.tensor([1e-9]))
    assert [i for i, x in enumerate(out[0].tolist()) if x != -INF] == [3]


def test_top_p_ties_are_deterministic():
    # four equally likely tokens; p = 0.5 needs two of them: the lower ids win
    tied = [0.0, 5.0, -1.0, 5.0, 5.0, -2.0, 5.0, -3.0, -4.0, -5.0]
    for _ in range(3):
        out = apply_top_p(row(tied), torch.tensor([0.45]))
        assert [i for i, x in enumerate(out[0].tolist()) if x != -INF] == [1, 3]


def test_top_p_off_rows_unchanged():
    logits = rows(2)
    out = apply_top_p(logits, torch.tensor([1.0, 0.5]))
    assert torch.equal(out[0], logits[0])
    assert (out[1] == -INF).any()


# ---------------------------------------------------------------------- min-p


def test_min_p_by_hand():
    p = np_softmax(ROW)
    # min_p 0.3: keep prob >= 0.3 * p(3.0) <=> logit >= 3.0 + ln 0.3 = 1.796
    out = apply_min_p(row(), torch.tensor([0.3]))
    kept = [i for i, x in enumerate(out[0].tolist()) if x != -INF]
    assert kept == [0, 3, 8]
    assert kept == [i for i in range(V) if p[i] >= 0.3 * p.max()]
    assert 3.0 + math.log(0.3) < 2.0
    out = apply_min_p(row(), torch.tensor([1.0]))
    assert [i for i, x in enumerate(out[0].tolist()) if x != -INF] == [3]


def test_min_p_off_rows_unchanged():
    logits = rows(2)
    out = apply_min_p(logits, torch.tensor([0.0, 0.2]))
    assert torch.equal(out[0], logits[0])
    assert (out[1] == -INF).any()


# ----------------------------------------------------- no in-place modification


def test_no_transform_modifies_its_input():
    logits = rows(3, seed=7)
    seen = token_mask([[1, 2], [3], [4, 4]], V)
    counts = token_counts([[1, 2], [3], [4, 4]], V)
    bias = torch.zeros((3, V))
    bias[:, 5] = 3.0
    suppress = torch.zeros((3, V), dtype=torch.bool)
    suppress[:, 6] = True
    params = [
        (apply_repetition_penalty, (seen, torch.tensor([1.2, 0.8, 1.0]))),
        (apply_presence_frequency_penalties, (counts, torch.tensor([0.5, 0.0, 1.0]), torch.tensor([0.2, 0.3, 0.0]))),
        (apply_logit_bias, (bias,)),
        (apply_min_tokens, (suppress,)),
        (apply_temperature, (torch.tensor([0.5, 1.0, 2.0]),)),
        (apply_top_k, (torch.tensor([2, 0, 5]),)),
        (apply_top_p, (torch.tensor([0.5, 1.0, 0.9]),)),
        (apply_min_p, (torch.tensor([0.1, 0.0, 0.5]),)),
    ]
    for fn, args in params:
        before = logits.clone()
        args_before = [a.clone() for a in args]
        out = fn(logits, *args)
        assert torch.equal(logits, before), fn.__name__
        for a, b in zip(args, args_before):
            assert torch.equal(a, b), fn.__name__
        assert out.data_ptr() != logits.data_ptr(), fn.__name__
        assert not torch.equal(out, logits), fn.__name__  # each transform did act on some row
        # and "all rows off" still returns a fresh tensor
    for fn, off in [
        (apply_top_k, torch.zeros(3, dtype=torch.int64)),
        (apply_top_p, torch.ones(3)),
        (apply_min_p, torch.zeros(3)),
        (apply_temperature, torch.ones(3)),
    ]:
        out = fn(logits, off)
        assert torch.equal(out, logits)
        out.add_(1.0)
        assert not torch.equal(out, logits), fn.__name__


# ------------------------------------------------ mixed batch == rows alone


def test_mixed_params_batch_equals_rows_alone():
    n = 6
    logits = rows(n, seed=3)
    histories = [[1, 2, 2], [], [9, 9, 0], [4], [5, 6, 7, 5], [3, 3]]
    seen = token_mask(histories, V)
    counts = token_counts(histories, V)
    rep = torch.tensor([1.0, 1.3, 0.7, 2.0, 1.0, 1.1])
    pres = torch.tensor([0.0, 0.5, -1.0, 0.0, 2.0, 0.1])
    freq = torch.tensor([0.0, 0.1, 0.0, -0.5, 0.3, 0.0])
    bias = torch.zeros((n, V))
    bias[1, 2] = 5.0
    bias[4, 9] = -7.0
    suppress = torch.zeros((n, V), dtype=torch.bool)
    suppress[2, 0] = True
    temp = torch.tensor([1.0, 0.7, 1.5, 0.0, 0.3, 2.0])
    top_k = torch.tensor([0, 3, 5, 0, 1, 8])
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.8, 1.0, 0.3])
    min_p = torch.tensor([0.0, 0.05, 0.2, 0.0, 0.5, 0.1])

    def pipeline(x, sl):
        x = apply_repetition_penalty(x, seen[sl], rep[sl])
        x = apply_presence_frequency_penalties(x, counts[sl], pres[sl], freq[sl])
        x = apply_logit_bias(x, bias[sl])
        x = apply_min_tokens(x, suppress[sl])
        x = apply_temperature(x, temp[sl])
        x = apply_top_k(x, top_k[sl])
        x = apply_top_p(x, top_p[sl])
        return apply_min_p(x, min_p[sl])

    batched = pipeline(logits, slice(None))
    for i in range(n):
        alone = pipeline(logits[i : i + 1], slice(i, i + 1))
        assert torch.equal(batched[i : i + 1], alone), i
    # the batch really mixes behaviours: row 0 is all "off"
    assert torch.equal(batched[0], logits[0])
    assert (batched[4] != -INF).sum() == 1
