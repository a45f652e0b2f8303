"""The student's network weights as one safetensors file, recipe and sampling times in the metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import recipe as recipe_mod


def export_safetensors(run, out: str | Path) -> Path:
    """Write the student's backbone state dict (diffusers key names for UNets) to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = run.student.net.net
    metadata = {
        "format": "pt",
        "stepdistill.recipe": recipe_mod.dump(run.recipe),
        "stepdistill.steps": str(run.student.steps),
        "stepdistill.times": json.dumps(run.student.times),
        "stepdistill.native_timesteps": json.dumps([float(run.student.schedule.native(torch.tensor(t)))
                                                    for t in run.student.times]),
        "stepdistill.prediction": run.student.net.prediction,
        "stepdistill.iteration": str(run.step),
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out, metadata=metadata)
    return out
