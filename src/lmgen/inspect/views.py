"""The inspector's JSON: tokens shown readably (byte-level pieces, partial UTF-8 as <0xNN>, special tokens marked)
and a session's steps with their candidates, timings and KV-cache figures.  The page and notebooks read the same."""

from __future__ import annotations

from lmgen.inspect.session import InspectSession, Step, controls
from lmgen.server.outputs import TokenText


class TokenView:
    """Token id -> {id, text, piece, special}; `text` is readable: the UTF-8 text, or <0xNN> for partial bytes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.token_text = tokenizer, TokenText(tokenizer)

    def text(self, tid: int) -> str:
        text = self.token_text.text(tid)
        if "\ufffd" in text:  # a piece of a multi-byte character: show its bytes
            return "".join(f"<0x{b:02X}>" for b in self.token_text.bytes(tid))
        return text

    def token(self, tid: int) -> dict:
        return {"id": tid, "text": self.text(tid), "piece": self.tokenizer.convert_ids_to_tokens([tid])[0],
                "special": self.tokenizer.is_special(tid)}


def step_json(step: Step, tv: TokenView) -> dict:
    v, f = step.view, step.fwd
    chosen = step.token if step.token is not None else v.sampler_token
    return {
        "index": step.index,
        "pending": step.token is None,
        "params": controls(step.params),
        "greedy": v.greedy,
        "candidates": [{**c, **tv.token(c["id"])} for c in v.candidates],
        "kept_count": v.kept_count,
        "kept_raw_mass": v.kept_raw_mass,
        "sampler_token": tv.token(v.sampler_token),
        "chosen": {**tv.token(chosen), "forced": step.forced},
        "timing": {"forward_ms": f.latency_ms, "filter_ms": step.filter_ms},
        "kv": {"context_tokens": f.context_tokens, "cached_tokens": f.cached_tokens,
               "computed_tokens": f.context_tokens - f.cached_tokens, **f.kv},
    }


def session_json(s: InspectSession, tv: TokenView, context_length: int) -> dict:
    out = s.output_ids
    return {
        "id": s.id,
        "mode": s.mode,
        "prompt_text": s.prompt_text,
        "prompt_tokens": [tv.token(t) for t in s.prompt_ids],
        "prompt_token_count": len(s.prompt_ids),
        "output_tokens": [tv.token(t) for t in out],
        "output_text": tv.tokenizer.decode(out, skip_special_tokens=False),
        "context_length": context_length,
        "params": controls(s.params),
        "top_n": s.top_n,
        "finished": s.finished,
        "steps": [step_json(st, tv) for st in s.steps],
    }
