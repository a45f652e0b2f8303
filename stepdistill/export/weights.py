"""The student's network weights as one safetensors file, recipe and sampling times in the metadata.

A multi-student run goes into the same single file: student k's backbone under the key prefix `students.k.`, and the
routing (rule, each student's classes and iterations) as JSON in the metadata under `stepdistill.routing`. One file
keeps what belongs together (students are only meaningful with their routing) and loads with one `load_file`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import recipe as recipe_mod
from ..models.lora import merged


def export_safetensors(run, out: str | Path) -> Path:
    """Write the student's backbone state dict (diffusers key names for UNets) to `out`; for a multi-student run every
    student's, prefixed `students.k.`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
    save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata=metadata)
    return out
