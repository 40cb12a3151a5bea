"""lmgen's beam_search against Hugging Face transformers' generate().

The oracle is ``LlamaForCausalLM.generate(num_beams=K, ...)`` on small
random-initialised models; lmgen's ``beam_search`` gets its log-probabilities
from the same model (full-vocabulary log_softmax of the last position) and
must return the same sequences, in the same order, with the same scores.
"""

from __future__ import annotations

import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GenerationConfig, LlamaForCausalLM  # noqa: E402

from lmgen.sampling.beam import BeamResult, beam_search, candidates_needed  # noqa: E402

from conftest import tiny_hf_llama  # noqa: E402

VOCAB = 96
PAD = 95  # non-zero: transformers fills with `pad_token_id or eos`
MAX_NEW = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def make_model(seed: int) -> LlamaForCausalLM:
    # a wide init makes the random model's distributions peaked, so that beams diverge and EOS gets chosen
    return tiny_hf_llama(VOCAB, seed, initializer_range=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


@torch.no_grad()
def logprob_fn(model):
    calls = []

    def next_logprobs(seqs: list[list[int]]) -> list[dict[int, float]]:
        calls.append([list(s) for s in seqs])
        assert len({len(s) for s in seqs}) == 1, "beam_search must ask for same-length sequences"
        ids = torch.tensor(seqs, dtype=torch.int64)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :].float()
        lps = torch.log_softmax(logits, dim=-1)
        return [dict(enumerate(row.tolist())) for row in lps]

    next_logprobs.calls = calls
    return next_logprobs


@torch.no_grad()
def hf_generate(model, prompt, eos, **kw):
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=eos, pad_token_id=PAD, do_sample=False
    )
    ids = torch.tensor([prompt])
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        output_scores=True,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=False,
        **kw,
    )


# (model seed, prompt); the EOS id of each case is chosen below from the
# model's own preferences so that EOS is really generated.
CASES = [
    (0, [1, 17, 42, 5, 63]),
    (1, [1, 8, 8, 91, 30, 12, 4]),
    (2, [1, 77]),
]


@pytest.fixture(scope="module")
def models():
    return {seed: make_model(seed) for seed, _ in CASES}


def pick_eos(model, prompt) -> int:
    """A token that the K=4 beam search (without EOS) generates at its 3rd
    step: with it as EOS, the search must handle finished hypotheses."""
    out = hf_generate(model, prompt, eos=None, num_beams=4, num_return_sequences=4, length_penalty=1.0)
    return int(out.sequences[0, len(prompt) + 2])


@pytest.fixture(scope="module")
def eos_ids(models):
    return {seed: pick_eos(models[seed], prompt) for seed, prompt in CASES}


def strip(seq: torch.Tensor, prompt_len: int, length: int) -> list[int]:
    return seq[prompt_len : prompt_len + length].tolist()


def check_against_hf(model, prompt, eos, K, lp, es) -> list[BeamResult]:
    fn = logprob_fn(model)
    ours = beam_search(
        prompt,
        fn,
        beam_width=K,
        max_tokens=MAX_NEW,
        eos_token_ids={eos},
        length_penalty=lp,
        early_stopping=es,
        n=K,
    )
    out = hf_generate(
        model, prompt, eos, num_beams=K, num_return_sequences=K, length_penalty=lp, early_stopping=es
    )
    P = len(prompt)
    assert len(ours) == out.sequences.shape[0] == K
    if K == 1:
        # generate(num_beams=1) is greedy search: no sequences_scores; the
        # score is the transformers beam formula over the raw logits.
        gen = out.sequences[0, P:].tolist()
        if eos in gen:
            gen = gen[: gen.index(eos) + 1]
        assert ours[0].token_ids == gen
        chosen = [
            torch.log_softmax(step[0].float(), -1)[tok] for step, tok in zip(out.logits, gen)
        ]
        cum = torch.stack(chosen).sum()
        assert ours[0].cumulative_logprob == pytest.approx(float(cum), abs=1e-5)
        assert ours[0].score == pytest.approx(float(cum) / len(gen) ** lp, abs=1e-5)
    else:
        lengths = (out.beam_indices != -1).sum(dim=1).tolist()
        for i, res in enumerate(ours):
            hf_tokens = strip(out.sequences[i], P, lengths[i])
            assert res.token_ids == hf_tokens, (i, res, hf_tokens)
            # the rest of HF's row is padding
            assert (out.sequences[i, P + lengths[i] :] == PAD).all()
            # (a negative length penalty multiplies the float32 rounding
            # noise of the cumulative log-prob by up to MAX_NEW)
            tol = 1e-5 * max(1.0, len(res.token_ids) ** -lp)
            assert res.score == pytest.approx(float(out.sequences_scores[i]), abs=tol)
            # score really is cumulative / L ** lp
            assert res.score == pytest.approx(res.cumulative_logprob / len(res.token_ids) ** lp, rel=1e-5)
    for res in ours:
        assert 1 <= len(res.token_ids) <= MAX_NEW
        assert res.finish_reason == ("stop" if res.token_ids[-1] == eos else "length")
        if res.finish_reason == "length":
            assert len(res.token_ids) == MAX_NEW
        assert eos not in res.token_ids[:-1]
    # sorted best first
    scores = [r.score for r in ours]
    assert scores == sorted(scores, reverse=True)
    # every call gets same-length sequences, no duplicate work
    for call in fn.calls:
        assert len(call) == len({tuple(s) for s in call}) <= K
    return ours


def test_eos_choice_is_not_trivial(models, eos_ids):
    for seed, prompt in CASES:
        assert eos_ids[seed] not in (PAD,)


@pytest.mark.parametrize("K,lp,es", list(itertools.product([1, 2, 4], [0.5, 1.0, 2.0], [False, True])))
def test_matches_transformers(models, eos_ids, K, lp, es):
    reasons = []
    for seed, prompt in CASES:
        results = check_against_hf(models[seed], prompt, eos_ids[seed], K, lp, es)
        reasons += [r.finish_reason for r in results]
    # EOS must really be exercised.  (With length_penalty 2 long hypotheses
    # are favoured so strongly that they may outrank every EOS hypothesis;
    # those still go through the finished-hypotheses bookkeeping.)
    if lp <= 1.0:
        assert "stop" in reasons


def test_both_finish_reasons_occur(models, eos_ids):
    seen = set()
    for (seed, prompt), K in itertools.product(CASES, [2, 4]):
        for r in check_against_hf(models[seed], prompt, eos_ids[seed], K, 1.0, False):
            seen.add(r.finish_reason)
    assert seen == {"stop", "length"}


@pytest.mark.parametrize("lp", [0.5, 2.0, -1.0])
def test_early_stopping_never(models, eos_ids, lp):
    for seed, prompt in CASES:
        check_against_hf(models[seed], prompt, eos_ids[seed], 4, lp, "never")


def test_no_eos_runs_to_length_and_n_subset(models):
    seed, prompt = CASES[0]
    model = models[seed]
    fn = logprob_fn(model)
    full = beam_search(prompt, fn, beam_width=3, max_tokens=MAX_NEW, eos_token_ids=set(), n=3)
    out = hf_generate(model, prompt, None, num_beams=3, num_return_sequences=2)
    top2 = beam_search(prompt, logprob_fn(model), beam_width=3, max_tokens=MAX_NEW, eos_token_ids=set(), n=2)
    assert top2 == full[:2]
    for i, res in enumerate(top2):
        assert res.finish_reason == "length"
        assert res.token_ids == out.sequences[i, len(prompt) :].tolist()
        assert res.score == pytest.approx(float(out.sequences_scores[i]), abs=1e-5)


def test_truncated_distributions_are_enough(models, eos_ids):
    """Returning only the top candidates_needed() tokens gives the same result."""
    seed, prompt = CASES[1]
    model, eos = models[seed], eos_ids[seed]
    full_fn = logprob_fn(model)
    need = candidates_needed(4, {eos})
    assert need == 8

    def top_only(seqs):
        out = []
        for d in full_fn(seqs):
            best = sorted(d.items(), key=lambda kv: -kv[1])[:need]
            out.append(dict(best))
        return out

    a = beam_search(prompt, logprob_fn(model), beam_width=4, max_tokens=MAX_NEW, eos_token_ids={eos}, n=4)
    b = beam_search(prompt, top_only, beam_width=4, max_tokens=MAX_NEW, eos_token_ids={eos}, n=4)
    assert a == b


def test_argument_validation():
    fn = lambda seqs: [{0: -0.1, 1: -2.5} for _ in seqs]  # noqa: E731
    with pytest.raises(ValueError, match="beam_width"):
        beam_search([1], fn, beam_width=0, max_tokens=3, eos_token_ids={0})
    with pytest.raises(ValueError, match="max_tokens"):
        beam_search([1], fn, beam_width=2, max_tokens=0, eos_token_ids={0})
    with pytest.raises(ValueError, match="n must be"):
        beam_search([1], fn, beam_width=2, max_tokens=3, eos_token_ids={0}, n=3)
    with pytest.raises(ValueError, match="early_stopping"):
        beam_search([1], fn, beam_width=2, max_tokens=3, eos_token_ids={0}, early_stopping="sometimes")
    # too few candidates for 2 beams (needs 4 per sequence)
    with pytest.raises(ValueError, match="at least 4"):
        beam_search([1], fn, beam_width=2, max_tokens=3, eos_token_ids={0})
    fn4 = lambda seqs: [{0: -0.1, 1: -2.5, 2: -3.0, 3: -4.0} for _ in seqs]  # noqa: E731
    res = beam_search([1], fn4, beam_width=2, max_tokens=3, eos_token_ids={0}, n=2)
    # hand-checked: "0" (EOS) at step 1 scores -0.1; the best live beam "1"
    # continues with EOS: (-2.5 - 0.1) / 2 = -1.3
    assert [r.token_ids for r in res] == [[0], [1, 0]]
    assert [r.finish_reason for r in res] == ["stop", "stop"]
    assert res[0].score == pytest.approx(-0.1) and res[1].score == pytest.approx(-1.3)


@pytest.mark.parametrize("es", [False, True])
def test_multiple_eos_ids(models, eos_ids, es):
    """Two EOS ids: transformers keeps (1 + 2) * K continuations per step."""
    seed, prompt = CASES[0]
    model = models[seed]
    second = pick_eos(model, prompt[:-1])  # another token the model likes
    eos = [eos_ids[seed], second] if second != eos_ids[seed] else [eos_ids[seed], 7]
    K = 3
    ours = beam_search(
        prompt, logprob_fn(model), beam_width=K, max_tokens=MAX_NEW, eos_token_ids=set(eos),
        early_stopping=es, n=K,
    )
    out = hf_generate(model, prompt, eos, num_beams=K, num_return_sequences=K, early_stopping=es)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    assert [r.token_ids for r in ours] == [strip(out.sequences[i], len(prompt), lengths[i]) for i in range(K)]
    for r, s in zip(ours, out.sequences_scores.tolist()):
        assert r.score == pytest.approx(s, abs=1e-5)
    assert any(r.finish_reason == "stop" for r in ours)
