"""Train several recipes one after another and tabulate their students side by side.

    python scripts/compare_objectives.py configs/fashion/*_1step.yaml configs/fashion/sid_lsg_2step.yaml \\
        --outdir runs/compare --report docs/objectives_fashion.md

Each recipe trains with `stepdistill train` in its own process (one at a time: on a small machine, concurrent runs
would share the cores and distort wall-time budgets) into OUTDIR/<recipe name>; a run that already has metrics.json
is not retrained, so an interrupted comparison resumes. Students are scored with the recipe's eval protocol at 1 NFE
and, for few-step students, at their K steps too.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def score(run_dir: Path) -> dict:
    from stepdistill.eval.harness import domain_score, generate_student
    from stepdistill.run import load_run

    run = load_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    e, k = run.recipe.eval, run.recipe.generator.steps
    reference = run.teacher.sample(e.n, torch.Generator().manual_seed(e.seed + 1)) if run.teacher.domain == "gmm" \
        else None
    by_nfe = {k: metrics["student"]}
    if k > 1:
        x = generate_student(run.student, run.teacher, e.n, e.seed, e.batch_size, steps=1)
        by_nfe[1] = domain_score(run.teacher, x, reference)
    key = "fd" if "fd" in metrics["student"] else "energy_distance"
    return {"recipe": run.recipe.objective.name, "steps": k, "iterations": summary["iterations"],
            "train_seconds": summary["train_seconds"], "key": key,
            "student": {nfe: v[key] for nfe, v in sorted(by_nfe.items())},
            "teacher": metrics["teacher"][key], "teacher_nfe": metrics["teacher"]["nfe"], "n": e.n}


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
    lines = [f"| recipe | objective | K | iterations | train time | {label} @1 NFE | {label} @K NFE | teacher "
             f"({rows[0][1]['teacher_nfe']} NFE) |", "|---|---|---|---|---|---|---|---|"]
    for recipe, r in rows:
        at1 = r["student"].get(1)
        atk = r["student"][r["steps"]] if r["steps"] > 1 else None
        lines.append(f"| `{recipe}` | {r['recipe']} | {r['steps']} | {r['iterations']} | "
                     f"{r['train_seconds'] / 60:.1f} min | {at1:.3f} | {'' if atk is None else f'{atk:.3f}'} | "
                     f"{r['teacher']:.3f} |")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    table = "\n".join(lines) + f"\n\nn = {rows[0][1]['n']} samples per side; {machine}.\n"
    print(table)
    (Path(args.outdir) / "comparison.json").write_text(json.dumps([r for _, r in rows], indent=2))
    if args.report:
        Path(args.report).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
