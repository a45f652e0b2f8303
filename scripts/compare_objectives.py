"""Train several recipes one after another and tabulate their students side by side.

    python scripts/compare_objectives.py configs/fashion/*_1step.yaml configs/fashion/sid_lsg_2step.yaml \\
        --outdir runs/compare --report docs/objectives_fashion.md

Each recipe trains with `stepdistill train` in its own process (one at a time: on a small machine, concurrent runs
would share the cores and distort wall-time budgets) into OUTDIR/<recipe name>; a run that already has metrics.json
is not retrained, so an interrupted comparison resumes. Every student is scored with its recipe's eval protocol at 1,
2 and 4 NFE (the few-step rule re-noises and predicts again, so a one-step student can take more steps and a K-step
student fewer); the scores are cached in OUTDIR/<recipe name>/nfe_scores.json.

`stepdistill bench` does the same for a suite file, with one budget imposed on every recipe, several seeds, curves
and sample grids; this script keeps each recipe's own settings (it made the README's Fashion-MNIST table).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

NFES = (1, 2, 4)

def score(run_dir: Path) -> dict:
    from stepdistill.bench import score_run

    r = score_run(run_dir, list(NFES))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**r, "recipe": r["objective"], "steps": r["trained_k"], "teacher": metrics["teacher"][r["key"]],
            "teacher_nfe": metrics["teacher"]["nfe"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("recipes", nargs="+")
    p.add_argument("--outdir", default="runs/compare")
    p.add_argument("--report", default=None, help="write the markdown table here too")
    args = p.parse_args()
    rows = []
    for recipe in args.recipes:
        name = Path(recipe).stem
        run_dir = Path(args.outdir) / name
        if not (run_dir / "metrics.json").exists():
            print(f"== training {recipe} -> {run_dir}", flush=True)
            subprocess.run([sys.executable, "-m", "stepdistill.cli", "train", recipe, "--outdir", str(run_dir),
                            "--quiet"], check=True)
        rows.append((recipe, score(run_dir)))
    key = rows[0][1]["key"]
    label = "FD" if key == "fd" else "energy distance"
    lines = ["| recipe | objective | trained K | iterations | train time | "
             + " | ".join(f"{label} @{n} NFE" for n in NFES) + f" | teacher ({rows[0][1]['teacher_nfe']} NFE) |",
             "|---|---|---|---|---|" + "---|" * len(NFES) + "---|"]
    for recipe, r in rows:
        cells = [f"**{r['student'][n]:.3f}**" if n == r["steps"] else f"{r['student'][n]:.3f}" for n in NFES]
        lines.append(f"| `{recipe}` | {r['recipe']} | {r['steps']} | {r['iterations']} | "
                     f"{r['train_seconds'] / 60:.1f} min | " + " | ".join(cells) + f" | {r['teacher']:.3f} |")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    table = "\n".join(lines) + (f"\n\nBold: the step count the student was trained for. n = {rows[0][1]['n']} samples "
                                 f"per side; {machine}.\n")
    print(table)
    (Path(args.outdir) / "comparison.json").write_text(json.dumps([r for _, r in rows], indent=2))
    if args.report:
        Path(args.report).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
