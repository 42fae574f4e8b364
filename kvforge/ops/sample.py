"""Greedy sampling as a tensor op, torch reference: the token of each row's largest logit."""

from __future__ import annotations

import torch


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of `logits` `[n, vocab]` (any float dtype): int64 `[n]`, the first index
    on ties, as `torch.argmax`. Returns a new tensor on logits' device."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"greedy_tokens needs logits [n, vocab] with vocab > 0, got {tuple(logits.shape)}")
    return logits.argmax(dim=-1)
