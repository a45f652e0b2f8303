"""Write docs/plans.md: `stepdistill plan` of every configs/plan/*.yaml at a few GPU counts, one table.

Each recipe is planned at the --gpus counts and at the count its own first line's command gives (the recipe's
published setting); a count the global batch does not split over is left out. A row that does not fit names the
cheapest change `stepdistill plan` suggests (its first fitting candidate). Everything runs on the meta device: no GPU,
no weights, a few minutes on a laptop.

    OMP_NUM_THREADS=1 python scripts/plan_table.py                      # 1 and 8 GPUs of 80 GiB
    OMP_NUM_THREADS=1 python scripts/plan_table.py --gpus 1 8 64 --gpu-memory 141GB
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from stepdistill.plan import HEADROOM, GiB, parse_bytes, plan, suggest
from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.teachers.synthetic import TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "plans.md"


def own_gpus(path: Path) -> int | None:
    """The --gpus of the recipe's first-line command, if any."""
    m = re.search(r"--gpus\s+(\d+)", path.read_text().splitlines()[0])
    return int(m.group(1)) if m else None


def family(recipe) -> str:
    """The network a recipe's teacher builds: a synthetic size and its diffusers class, else the teacher's name."""
    size = getattr(recipe.teacher, "size", None)
    if size is None:
        return recipe.teacher.name
    return f"{size} ({TRANSFORMERS[size].cls if size in TRANSFORMERS else 'UNet2DConditionModel'})"


def change_text(s: dict, gpus: int) -> str:
    """A suggestion as `overrides` (what they do, unless a combination) [on N GPUs] -> its peak."""
    what = "" if s["change"].startswith("together") else f" ({s['change']})"
    where = f" on {s['gpus']} GPUs" if s["gpus"] != gpus else ""
    return f"`{' '.join(s['overrides'])}`{what}{where} → {s['peak'] / GiB:.1f}"


def row(path: Path, gpus: int, memory: int) -> str | None:
    recipe = load_recipe(path)
    try:
        p = plan(recipe, gpus, memory)
    except RecipeError:  # the global batch does not split over this many GPUs
        return None
    change = "—"
    if not p.fits:
        found = suggest(recipe, gpus, memory, limit=99)  # in candidate order: the cheapest first
        change = "none found" if not found else change_text(found[0], gpus)
    flops = f"{p.flops / 1e12:.1f}" if p.flops is not None else "?"
    notes = " (activations not all counted)" if p.notes else ""
    return (f"| {path.name} | {family(recipe)} | {p.trainable / 1e9:.3f}B | {gpus} | {p.micro_batch} | "
            f"{p.peak / GiB:.1f}{notes} | {'yes' if p.fits else 'no'} | {flops} | {change} |")


def main(argv: list[str] | None = None) -> int:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    a.add_argument("--gpu-memory", default="80GiB")
    a.add_argument("--configs", default="configs/plan/*.yaml", help="glob under the repository root")
    a.add_argument("--out", default=str(OUT))
    args = a.parse_args(argv)
    memory = parse_bytes(args.gpu_memory)
    start, rows = time.time(), []
    for path in sorted(ROOT.glob(args.configs)):
        for n in sorted(set(args.gpus) | {own_gpus(path) or args.gpus[0]}):
            t0 = time.time()
            line = row(path, n, memory)
            print(f"{path.name} --gpus {n}: {time.time() - t0:.0f} s", flush=True)
            if line is not None:
                rows.append(line)
    minutes = (time.time() - start) / 60
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["OMP_NUM_THREADS=1 python scripts/plan_table.py", *given])
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    text = "\n".join([
        "# Memory plans of the plan recipes",
        "",
        f"Made by `{command}` in {minutes:.1f} minutes on {platform.machine()} with {cores} CPU cores and {gpu} "
        f"(torch {torch.__version__}); every network built on the meta device at its real size, no weights.",
        "",
        f"Per GPU of {args.gpu_memory}, one training iteration (`stepdistill plan RECIPE --gpus N --gpu-memory "
        f"{args.gpu_memory}`, stepdistill/plan.py): the peak is what torch.cuda.max_memory_allocated would report; "
        f"a run fits when it stays under {1 - HEADROOM:.0%} of the card. FLOPs per GPU per iteration (iteration 0: "
        "every phase of the objective, recomputation under gradient checkpointing included). The synthetic teachers "
        "(stepdistill/teachers/synthetic.py) are random networks at the real models' sizes. The change is the cheapest "
        "of those `stepdistill plan` tries that makes the run fit, with the peak it then plans (GiB).",
        "",
        "| recipe | family | trained params | GPUs | micro-batch | peak GiB | fits? | TFLOP / iteration "
        "| cheapest change that fits |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows, ""])
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
