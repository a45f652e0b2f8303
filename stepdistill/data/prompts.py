"""Prompt datasets: a text file (one prompt per line), a CSV or a JSONL file with a prompt column.

Text-to-image distillation is data-free: a run needs prompts, not images. Empty prompts are an error wherever they
come from (in a text file they would silently shift prompts against images); prompts longer than the text
encoder's context are truncated when encoded, and the teacher says how many were (models/text.py).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import InputError, MissingFileError

COLUMNS = ("prompt", "text", "caption")  # CSV columns / JSONL keys tried in this order


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a .txt, .csv or .jsonl file, stripped, in file order."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"prompt file not found: {p} (give a .txt with one prompt per line, a .csv or a "
                               f".jsonl with a {'/'.join(COLUMNS)} column)")
    suffix = p.suffix.lower()
    if suffix == ".csv":
        prompts = _from_csv(p)
    elif suffix == ".jsonl":
        prompts = _from_jsonl(p)
    else:
        prompts = [(i + 1, line) for i, line in enumerate(p.read_text(encoding="utf-8").splitlines())]
    empty = [where for where, text in prompts if not text.strip()]
    if empty:
        raise InputError(f"{p}: empty prompt on line(s) {', '.join(map(str, empty[:10]))}"
                         f"{' ...' if len(empty) > 10 else ''}; remove them (one prompt per line/row)")
    if not prompts:
        raise InputError(f"{p} holds no prompts")
    return [text.strip() for _, text in prompts]


def _column(names: list[str], p: Path) -> str:
    for c in COLUMNS:
        if c in names:
            return c
    raise InputError(f"{p}: no prompt column; expected one of {', '.join(COLUMNS)}, found {', '.join(names) or 'none'}")


def _from_csv(p: Path) -> list[tuple[int, str]]:
    with p.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        col = _column(list(reader.fieldnames or []), p)
        return [(reader.line_num, row[col] or "") for row in reader]


def _from_jsonl(p: Path) -> list[tuple[int, str]]:
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue  # blank lines between JSON records carry no prompt
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}: line {i + 1} is not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{p}: line {i + 1} is not a JSON object")
        text = record.get(_column(list(record), p))
        if not isinstance(text, str):
            raise InputError(f"{p}: line {i + 1}: the prompt is {type(text).__name__}, not a string")
        out.append((i + 1, text))
    return out
