"""Train one recipe under several sets of overrides, one run at a time, and tabulate the validation scores.

    python scripts/sweep.py configs/fashion/vsd_1step.yaml --outdir runs/sweep_demo \\
        --variant base "" --variant ema "train.ema=0.99" --seeds 0 1 2

Every run is `stepdistill train RECIPE OVERRIDES eval.split=val` (the held-out training images: settings are chosen
on them, never on the test set) in OUTDIR/NAME/seed_S; a finished run is not retrained, so an interrupted sweep
resumes. OUTDIR/results.md gets one row per variant in OUTDIR, this invocation's and earlier ones' (each variant's
recipe and overrides are kept in OUTDIR/NAME/variant.json): the median validation score over its finished seeds, each
seed's score, iterations and training seconds. Run it alone on the machine when the recipe has a wall-time budget.
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
    for name, extra in a.variant:
        (a.outdir / name).mkdir(parents=True, exist_ok=True)
        (a.outdir / name / "variant.json").write_text(json.dumps({"recipe": a.recipe, "overrides": extra}) + "\n")
        for seed in a.seeds:
            run = a.outdir / name / f"seed_{seed}"
            if not (run / "metrics.json").exists():
                cmd = [sys.executable, "-m", "stepdistill", "train", a.recipe, "--outdir", str(run), "--quiet",
                       *shlex.split(extra), f"train.seed={seed}", f"eval.split={a.split}"]
                print("==", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            score, teacher, key, its, secs = read_run(run)
            print(f"== {name} seed {seed}: {key} {score:.4f} ({score / teacher:.2f}x the teacher's {teacher:.4f}), "
                  f"{its} iterations, {secs:.0f} s", flush=True)
    lines = [f"# {a.outdir}, scored on the {a.split} split", "",
             "`python scripts/sweep.py RECIPE --outdir OUTDIR --seeds SEEDS --variant NAME OVERRIDES`, one row per "
             "variant in OUTDIR", "",
             "| variant | recipe | overrides | median | x teacher | seeds | iterations | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for folder in sorted(a.outdir.glob("*/variant.json")):
        v = json.loads(folder.read_text())
        runs = [read_run(r) for r in sorted(folder.parent.glob("seed_*")) if (r / "metrics.json").exists()]
        if not runs:
            continue
        med, teacher = statistics.median(r[0] for r in runs), runs[0][1]
        lines.append(f"| {folder.parent.name} | `{v['recipe']}` | `{v['overrides'] or '-'}` | {med:.4f} | "
                     f"{med / teacher:.2f}x | {', '.join(f'{r[0]:.4f}' for r in runs)} | "
                     f"{', '.join(str(r[3]) for r in runs)} | {', '.join(f'{r[4]:.0f}' for r in runs)} |")
    (a.outdir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def read_run(run: Path) -> tuple[float, float, str, int, float]:
    """A finished run's score, its teacher's, the metric's name, iterations and training seconds (an MSD run: its
    students' summed)."""
    m = json.loads((run / "metrics.json").read_text())
    s = json.loads((run / "train_summary.json").read_text())
    key = next(k for k in ("fd", "energy_distance", "fid") if k in m["student"])
    parts = s.get("students", [s])
    return (m["student"][key], m["teacher"][key], key, sum(x["iterations"] for x in parts),
            sum(x["train_seconds"] for x in parts))

if __name__ == "__main__":
    main()
