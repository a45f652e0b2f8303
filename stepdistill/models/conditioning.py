"""Text conditions: prompts -> one condition tensor per prompt, in the layout of the pipeline family, cached, with the
family's null condition.

Every family's condition is a single (N, L, C) tensor, so objectives batch, index, repeat and concatenate it like
any other condition; the ScoreModel unpacks it at the network boundary:

- `sd` (SD1.x/2.x): the CLIP encoder's last hidden state, (N, 77, C).
- `sdxl`: both CLIP encoders' penultimate hidden states side by side, (N, 77, C1 + C2), then one *pooled row*
  holding the second encoder's pooled projection (zero-padded to C1 + C2): (N, 78, C1 + C2).
- `sd3`: both CLIPs' penultimate states side by side, zero-padded to the transformer's joint width D, followed by
  T5's T states (zeros for a folder without T5, as diffusers does), then the pooled row (both CLIPs' pooled
  projections side by side): (N, 77 + T + 1, D).
- `flux`: T5's T states (T = 512), then the pooled row (the CLIP encoder's pooled output): (N, T + 1, D).
- `sana`: Gemma's last hidden state of SANA's complex human instruction + the lower-cased prompt, the first token
  and the last 299 kept (SANA's select index), with the attention mask as one extra last column: (N, 300, C + 1).
  Its null condition is the encoded "" without the instruction, as SanaPipeline's negative prompt.

Classifier-free guidance needs an unconditional condition, and families disagree on what it is: SD1.5/2.1 and SD3
encode the empty prompt (`null: empty`); SDXL pipelines (force_zeros_for_empty_prompt) and DMD2 use all-zero
embeddings, pooled row included (`null: zeros`). The teacher, the generator and the fake score all use the one
chosen here.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import InputError

NULLS = ("empty", "zeros")
FAMILIES = ("sd", "sdxl", "sd3", "flux", "sana")


def pack_pooled(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(N, L, C) token states + (N, P) pooled embedding -> (N, L + 1, C), the pooled row zero-padded (P <= C)."""
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"pooled embedding of width {pooled.shape[-1]} does not fit a row of width {tokens.shape[-1]}")
    row = nn.functional.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))
    return torch.cat([tokens, row[:, None]], dim=1)


def unpack_pooled(cond: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_pooled: (token states (N, L, C), pooled (N, width))."""
    return cond[:, :-1], cond[:, -1, :width]


class TextEncoder(nn.Module):
    """Frozen text encoders + tokenizers of one family (see the module docstring); encodings are cached per prompt, on
    the CPU, in float32. `encoders[i]` may be None only for SD3's T5 (then `width` gives the joint width D)."""

    def __init__(self, tokenizers: list, encoders: list, null: str = "empty", family: str = "sd",
                 t5_length: int | None = None, width: int | None = None, instruction: list[str] | None = None,
                 sana_length: int = 300) -> None:
        super().__init__()
        if null not in NULLS:
            raise InputError(f"unknown null condition {null!r}; expected one of {', '.join(NULLS)} (empty: the "
                             "encoded empty prompt, as SD1.5/2.1/SD3; zeros: all-zero embeddings, as SDXL and DMD2)")
        if family not in FAMILIES:
            raise InputError(f"unknown text family {family!r}; expected one of {', '.join(FAMILIES)}")
        self.family, self.null, self.width, self.instruction = family, null, width, instruction
        self.tokenizers = list(tokenizers)
        self.encoders = nn.ModuleList([e.requires_grad_(False).eval() for e in encoders if e is not None])
        self.aligned = list(encoders)  # position i belongs to tokenizers[i] (None: no T5)
        # CLIP contexts: the tokenizer's (77) bounded by the encoder's positions (some tokenizers say 1e30); T5 and
        # Gemma contexts: the pipelines' default max_sequence_length (SD3 256, FLUX 512, SANA 300)
        clips = {"sd": 1, "sdxl": 2, "sd3": 2, "flux": 1, "sana": 0}[family]
        self.lengths = [min(int(tok.model_max_length), int(enc.config.max_position_embeddings))
                        for tok, enc in zip(self.tokenizers[:clips], self.aligned[:clips])]
        long_context = t5_length or {"sd3": 256, "flux": 512, "sana": sana_length}.get(family)
        self.lengths += [long_context] * (len(self.tokenizers) - clips)
        self._cache: dict[str, torch.Tensor] = {}

    def components(self) -> dict:
        """The pipeline components by their diffusers names: tokenizer, text_encoder, tokenizer_2, ... (None for an
        absent T5)."""
        out = {}
        for k, tokenizer, encoder in zip(("", "_2", "_3"), self.tokenizers, self.aligned):
            out.update({f"tokenizer{k}": tokenizer if encoder is not None else None, f"text_encoder{k}": encoder})
        return out

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def encoder(self) -> nn.Module:
        return self.aligned[0]

    @property
    def max_length(self) -> int:
        """The CLIP context (prompts longer than it are truncated)."""
        return self.lengths[0]

    def count_truncated(self, prompts: list[str]) -> int:
        """How many prompts are longer than the CLIP context (they are truncated to its first tokens when encoded)."""
        ids = self.tokenizer(prompts, truncation=False).input_ids
        return sum(len(i) > self.max_length for i in ids)

    def _run(self, i: int, prompts: list[str]):
        tok, enc = self.tokenizers[i], self.aligned[i]
        ids = tok(prompts, padding="max_length", max_length=self.lengths[i], truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(enc.device), output_hidden_states=True)

    def _sana(self, prompts: list[str], instruct: bool = True) -> torch.Tensor:
        tok, enc, length = self.tokenizer, self.encoder, self.max_length
        texts = [p.lower().strip() for p in prompts]
        select = slice(None)
        if instruct and self.instruction:
            head = "\n".join(self.instruction)
            texts = [head + t for t in texts]
            length = len(tok.encode(head)) + self.max_length - 2
            select = [0, *range(-self.max_length + 1, 0)]
        tok.padding_side = "right"
        batch = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask = batch.attention_mask.to(enc.device)
        hidden = enc(batch.input_ids.to(enc.device), attention_mask=mask)[0]
        return torch.cat([hidden[:, select], mask[:, select, None].to(hidden.dtype)], dim=-1)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        if self.family == "sana":
            return self._sana(prompts)
        if self.family == "sd":
            return self._run(0, prompts).last_hidden_state
        if self.family == "flux":
            return pack_pooled(self._run(1, prompts).last_hidden_state, self._run(0, prompts).pooler_output)
        clip = [self._run(i, prompts) for i in (0, 1)]
        tokens = torch.cat([o.hidden_states[-2] for o in clip], dim=-1)
        if self.family == "sdxl":
            return pack_pooled(tokens, clip[1].text_embeds)
        pooled = torch.cat([o.text_embeds for o in clip], dim=-1)
        tokens = nn.functional.pad(tokens, (0, self.width - tokens.shape[-1]))
        t5 = (self._run(2, prompts).last_hidden_state if self.aligned[2] is not None
              else tokens.new_zeros(len(prompts), self.lengths[2], self.width))
        return pack_pooled(torch.cat([tokens, t5.to(tokens.dtype)], dim=1), pooled)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, C) conditions of N prompts."""
        if next(self.parameters()).is_meta:  # built without weights (stepdistill plan): shapes only, nothing cached
            return self._encode(prompts).float()
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), 64):
            chunk = missing[i:i + 64]
            self._cache.update(zip(chunk, self._encode(chunk).float().cpu()))
        return torch.stack([self._cache[p] for p in prompts])

    def null_embedding(self) -> torch.Tensor:
        """(1, L, C): the unconditional condition of this family's convention."""
        with torch.no_grad():
            empty = self._sana([""], instruct=False).float().cpu() if self.family == "sana" else self([""])
        return torch.zeros_like(empty) if self.null == "zeros" else empty


def warn_truncated(encoder: TextEncoder, prompts: list[str], source: str) -> int:
    """Warn once when prompts of `source` exceed the context; returns how many do."""
    n = encoder.count_truncated(prompts)
    if n:
        warnings.warn(f"{n} of {len(prompts)} prompts in {source} are longer than the text encoder's "
                      f"{encoder.max_length} tokens and are truncated to their first {encoder.max_length}",
                      stacklevel=2)
    return n
