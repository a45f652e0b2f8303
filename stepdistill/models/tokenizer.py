"""A byte-level CLIP tokenizer written locally (no download): every byte is a token, there are no merges.

The bundled text-to-image teacher and the tests use it where a real pipeline has CLIP's BPE tokenizer: the same
CLIPTokenizer class, files and calls, just a vocabulary that needs nothing from a hub.
"""
from __future__ import annotations

import json
from pathlib import Path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (transformers 5 no longer exports it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_clip_tokenizer(path: str | Path, max_length: int = 77):
    """(CLIPTokenizer, vocab) from vocab.json + merges.txt written into `path`."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length), vocab


def text_config(vocab: dict, hidden: int = 32, layers: int = 2, heads: int = 2, max_length: int = 77) -> dict:
    """CLIPTextConfig arguments for a small text tower over this vocabulary."""
    return dict(vocab_size=len(vocab), max_position_embeddings=max_length, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
