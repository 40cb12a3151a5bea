"""N-gram prompt lookup (vLLM's `ngram`, transformers' `prompt_lookup_num_tokens`): find the latest earlier place
where the sequence's last n tokens occurred (prompt + output) and propose the tokens that followed it."""

from __future__ import annotations


class NgramProposer:
    """Proposes up to k tokens by suffix matching, longest n first (ngram_max down to ngram_min).

    The search scans at most `window` tokens back, so a step's cost is bounded whatever the context length."""

    def __init__(self, ngram_min: int, ngram_max: int, window: int = 4096):
        self.ngram_min, self.ngram_max, self.window = ngram_min, ngram_max, window

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens to follow `tokens` (may be empty: no match)."""
        n_tok = len(tokens)
        lo = max(0, n_tok - self.window)
        for n in range(min(self.ngram_max, n_tok - 1), self.ngram_min - 1, -1):
            suffix = tokens[n_tok - n:]
            first = suffix[0]
            # latest start j < n_tok - n with tokens[j:j+n] == suffix
            for j in range(n_tok - n - 1, lo - 1, -1):
                if tokens[j] == first and tokens[j:j + n] == suffix:
                    follow = tokens[j + n:j + n + k]
                    if follow:
                        return follow
                    break
        return []
