"""Text conditions: prompts -> the embeddings a cross-attention UNet reads, cached, with the family's null condition.

Classifier-free guidance needs an unconditional embedding, and families disagree on what it is: SD1.5/2.1 encode the
empty prompt (`null: empty`); DMD2's SDXL uses all-zero embeddings (`null: zeros`). The teacher, the generator and
the fake score all use the one chosen here.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

NULLS = ("empty", "zeros")


class TextEncoder(nn.Module):
    """A frozen CLIP text encoder + tokenizer (the SD1.5 / SD2.1 convention: the last hidden state of the prompt
    padded to the tokenizer's context, 77 tokens). Encodings are cached per prompt, on the CPU, in float32."""

    def __init__(self, tokenizer, text_encoder: nn.Module, null: str = "empty") -> None:
        super().__init__()
        if null not in NULLS:
            raise ValueError(f"unknown null condition {null!r}; expected one of {', '.join(NULLS)} (empty: the "
                             "encoded empty prompt, as SD1.5/2.1; zeros: all-zero embeddings, as DMD2's SDXL)")
        self.tokenizer, self.encoder, self.null = tokenizer, text_encoder.requires_grad_(False).eval(), null
        # the context: the tokenizer's (77 for CLIP), bounded by the encoder's positions (some tokenizers say 1e30)
        self.max_length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
        self._cache: dict[str, torch.Tensor] = {}

    def count_truncated(self, prompts: list[str]) -> int:
        """How many prompts are longer than the context (they are truncated to its first tokens when encoded)."""
        ids = self.tokenizer(prompts, truncation=False).input_ids
        return sum(len(i) > self.max_length for i in ids)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, C) embeddings of N prompts."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), 64):
            chunk = missing[i:i + 64]
            ids = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids
            hidden = self.encoder(ids.to(self.encoder.device))[0].float().cpu()
            self._cache.update(zip(chunk, hidden))
        return torch.stack([self._cache[p] for p in prompts])

    def null_embedding(self) -> torch.Tensor:
        """(1, L, C): the unconditional embedding of this family's convention."""
        empty = self([""])
        return torch.zeros_like(empty) if self.null == "zeros" else empty


def warn_truncated(encoder: TextEncoder, prompts: list[str], source: str) -> int:
    """Warn once when prompts of `source` exceed the context; returns how many do."""
    n = encoder.count_truncated(prompts)
    if n:
        warnings.warn(f"{n} of {len(prompts)} prompts in {source} are longer than the text encoder's "
                      f"{encoder.max_length} tokens and are truncated to their first {encoder.max_length}",
                      stacklevel=2)
    return n
