"""The student's network weights as one safetensors file, recipe and sampling times in the metadata.

A multi-student run goes into the same single file: student k's backbone under the key prefix `students.k.`, and the
routing (rule, each student's classes and iterations) as JSON in the metadata under `stepdistill.routing`. One file
keeps what belongs together (students are only meaningful with their routing) and loads with one `load_file`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import recipe as recipe_mod
from ..errors import InputError, OutputExistsError
from ..models.lora import merged


def export_safetensors(run, out: str | Path) -> Path:
    """Write the student's backbone state dict (diffusers key names for UNets) to `out`; for a multi-student run every
    student's, prefixed `students.k.`."""
    out = check_out(Path(out))
    student = run.student
    metadata = {
        "format": "pt",
        "stepdistill.recipe": recipe_mod.dump(run.recipe),
        "stepdistill.steps": str(student.steps),
        "stepdistill.times": json.dumps(student.times),
        "stepdistill.native_timesteps": json.dumps([float(student.schedule.native(torch.tensor(t)))
                                                    for t in student.times]),
        "stepdistill.iteration": str(run.step),
    }
    if hasattr(student, "routing"):  # MultiStudent
        metadata["stepdistill.prediction"] = student.students[0].net.prediction
        metadata["stepdistill.routing"] = json.dumps({**student.routing(), "iterations": run.student_steps,
                                                      "key_prefix": "students.{k}."})
        tensors = {f"students.{k}.{name}": v for k, g in enumerate(student.students)
                   for name, v in merged(g.net.net).state_dict().items()}
    else:
        metadata["stepdistill.prediction"] = student.net.prediction
        tensors = merged(student.net.net).state_dict()  # a LoRA student: adapters fused into the weights
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:  # written beside `out`, then renamed over it: a crash leaves the previous export whole
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def check_out(out: Path) -> Path:
    """`out` as a safetensors export may write it: a .safetensors path that is new or a previous export."""
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; --format safetensors writes one file: give a path ending in "
                         ".safetensors")
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: --format safetensors writes a .safetensors file; give a path ending in "
                         ".safetensors")
    if out.exists():
        try:
            with safe_open(str(out), "pt") as f:
                ours = "stepdistill.recipe" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 (not a safetensors file at all)
            ours = False
        if not ours:
            raise OutputExistsError(f"--out {out} exists and is not a stepdistill export; choose another --out: "
                                    "nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
