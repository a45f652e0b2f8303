"""The student's network weights as one safetensors file, recipe and sampling times in the metadata.

A multi-student run goes into the same single file: student k's backbone under the key prefix `students.k.`, and the
routing (rule, each student's classes and iterations) as JSON in the metadata under `stepdistill.routing`. One file
keeps what belongs together (students are only meaningful with their routing) and loads with one `load_file`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import recipe as recipe_mod
from ..errors import InputError, OutputExistsError
from ..files import write_atomic
from ..models.lora import merged

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_metadata(run) -> dict:
    """The safetensors metadata of an export: the recipe, the student's steps, times and the iteration."""
    student = run.student
    return {
        "format": "pt",
        "stepdistill.recipe": recipe_mod.dump(run.recipe),
        "stepdistill.steps": str(student.steps),
        "stepdistill.times": json.dumps(student.times),
        "stepdistill.native_timesteps": json.dumps([float(student.schedule.native(torch.tensor(t)))
                                                    for t in student.times]),
        "stepdistill.iteration": str(run.step),
    }


def export_safetensors(run, out: str | Path, dtype: str = "fp32") -> Path:
    """Write the student's backbone state dict (diffusers key names for UNets) to `out` in `dtype`; for a
    multi-student run every student's, prefixed `students.k.`."""
    out = check_out(Path(out))
    student = run.student
    metadata = export_metadata(run)
    if hasattr(student, "routing"):  # MultiStudent
        metadata["stepdistill.prediction"] = student.students[0].net.prediction
        metadata["stepdistill.routing"] = json.dumps({**student.routing(), "iterations": run.student_steps,
                                                      "key_prefix": "students.{k}."})
        tensors = {f"students.{k}.{name}": v for k, g in enumerate(student.students)
                   for name, v in merged(g.net.net).state_dict().items()}
    else:
        metadata["stepdistill.prediction"] = student.net.prediction
        tensors = merged(student.net.net).state_dict()  # a LoRA student: adapters fused into the weights
    if dtype != "fp32":
        metadata["stepdistill.dtype"] = dtype
    write_atomic({k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}, out, metadata)
    return out


def cast_folder(folder: Path, dtype: str) -> None:
    """Rewrite every .safetensors file under `folder` with its floating-point tensors in `dtype` (metadata kept): the
    precision of a diffusers folder or LoRA export, whose writers (save_pretrained, save_lora_weights) take no dtype
    of their own; casting the files leaves the run's modules as they were."""
    from safetensors.torch import load_file

    if dtype == "fp32":
        return
    for path in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(path).items()}
        save_file(tensors, path, metadata=metadata)


def check_out(out: Path, fmt: str = "safetensors") -> Path:
    """`out` as a `--format fmt` export may write it: a .safetensors path that is new or a previous export."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; --format {fmt} writes one file: give a path ending in "
                         ".safetensors")
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: --format {fmt} writes a .safetensors file; give a path ending in "
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
