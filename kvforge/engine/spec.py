"""Drafting for speculative decoding: prompt lookup (n-gram) proposals.

A decoding sequence whose last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`)
occurred before in its prompt or output proposes the tokens that followed their latest earlier
occurrence. Editing, summarising or quoting a given text repeats long runs of it, which this finds
for free; elsewhere it mostly finds nothing and costs a few array comparisons. Verification is the
engine's (one forward over the drafted tokens) and acceptance the sampler's (`verify_draft`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: Sequence[int], max_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to `max_tokens` tokens that followed the latest earlier occurrence of the longest suffix of
    `token_ids` of `min_n`..`max_n` tokens; [] when none occurs or max_tokens < 1. Pure."""
    total = len(token_ids)
    if max_tokens < 1 or total < min_n + 1:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # windows starting at 0 .. total - n - 1: every occurrence that has a token after it
        windows = sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == arr[total - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + max_tokens].tolist()
    return []
