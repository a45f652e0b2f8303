"""Train one recipe under several sets of overrides, one run at a time, and tabulate the validation scores.

    python scripts/sweep.py configs/fashion/vsd_1step.yaml --outdir runs/sweep_demo \\
        --variant base "" --variant ema "train.ema=0.99" --seeds 0 1 2

Every run is `stepdistill train RECIPE OVERRIDES eval.split=val` (the held-out training images: settings are chosen
on them, never on the test set) in OUTDIR/NAME/seed_S; a finished run is not retrained, so an interrupted sweep
resumes. OUTDIR/results.md gets one row per variant: the median validation score over the seeds, each seed's score,
iterations and training seconds. Run it alone on the machine when the recipe has a wall-time budget.
"""
import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--outdir", required=True, type=Path)
    p.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True,
                   help='a name and its overrides as one string ("" for the recipe as is)')
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split", default="val", choices=["val", "test"], help="the reference of the score (val)")
    a = p.parse_args()
    rows = []
    for name, extra in a.variant:
        scores, its, secs = [], [], []
        for seed in a.seeds:
            run = a.outdir / name / f"seed_{seed}"
            if not (run / "metrics.json").exists():
                cmd = [sys.executable, "-m", "stepdistill", "train", a.recipe, "--outdir", str(run), "--quiet",
                       *shlex.split(extra), f"train.seed={seed}", f"eval.split={a.split}"]
                print("==", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            m = json.loads((run / "metrics.json").read_text())
            s = json.loads((run / "train_summary.json").read_text())
            key = next(k for k in ("fd", "energy_distance", "fid") if k in m["student"])
            scores.append(m["student"][key])
            parts = s.get("students", [s])  # an MSD run: its students' iterations and seconds, summed
            its.append(sum(x["iterations"] for x in parts))
            secs.append(sum(x["train_seconds"] for x in parts))
            teacher = m["teacher"][key]
            print(f"== {name} seed {seed}: {key} {scores[-1]:.4f} ({scores[-1] / teacher:.2f}x the teacher's "
                  f"{teacher:.4f}), {its[-1]} iterations, {secs[-1]:.0f} s", flush=True)
        rows.append((name, extra, statistics.median(scores), scores, teacher, its, secs))
    lines = [f"# {a.recipe}, scored on the {a.split} split", "",
             f"`python scripts/sweep.py {a.recipe} --outdir {a.outdir} --seeds {' '.join(map(str, a.seeds))} "
             + " ".join(f'--variant {n} "{e}"' for n, e in a.variant) + "`", "",
             "| variant | overrides | median | x teacher | seeds | iterations | train s |",
             "|---|---|---|---|---|---|---|"]
    for name, extra, med, scores, teacher, its, secs in rows:
        lines.append(f"| {name} | `{extra or '-'}` | {med:.4f} | {med / teacher:.2f}x | "
                     f"{', '.join(f'{s:.4f}' for s in scores)} | {', '.join(map(str, its))} | "
                     f"{', '.join(f'{t:.0f}' for t in secs)} |")
    (a.outdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
