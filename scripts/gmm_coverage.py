"""Mode coverage of the toy recipes on a Gaussian mixture they were not tuned on (default: configs/toy/ring8).

For each recipe: train it (unless OUTDIR/<recipe>/ already holds a finished run) with its own settings plus the
mixture's overrides, `eval.at_end=false train.checkpoint_every=0` and any extra overrides, one run at a time; then
score N samples of the student at its trained step count K (seed 0) against N exact mixture samples (seed 1) and print
one row each: energy distance, share of samples near a component, worst relative mass error and its component. Rows for
the collapsed start (everything at the mixture's mean, where every student starts), the single Gaussian with the
mixture's exact mean and covariance, and the teacher's 35-NFE Heun sampler come first.

    OMP_NUM_THREADS=1 python scripts/gmm_coverage.py --outdir /tmp/ring                     (every gmm_* recipe but msd)
    OMP_NUM_THREADS=1 python scripts/gmm_coverage.py --outdir /tmp/ring_lr configs/toy/gmm_vsd.yaml --set train.lr=3e-4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = ROOT / "configs/toy/ring8/overrides.txt"
TARGET_NEAR, TARGET_MASS = 0.90, 0.50


def read_overrides(path: Path = MIXTURE) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]


def default_recipes() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "configs/toy").glob("gmm_*.yaml")) if p.stem != "gmm_msd"]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def code_identity(recipe: str) -> dict:
    """What code and recipe a run trained with (objectives change often): HEAD, and for the objective's file and the
    recipe its last commit and, when they differ from it, the working tree's blob hash."""
    import yaml

    objective = (yaml.safe_load((ROOT / recipe).read_text()) or {}).get("objective", {}).get("name", "?")
    out = {"head": _git("rev-parse", "--short", "HEAD")}
    for key, f in (("objective", f"stepdistill/objectives/{objective}.py"), ("recipe", recipe)):
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", f], cwd=ROOT).returncode != 0
        out[key] = _git("log", "-1", "--format=%h", "--", f) + (f"+wt:{_git('hash-object', f)[:7]}" if dirty else "")
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "stepdistill"], cwd=ROOT)
    out["tree_dirty"] = dirty.returncode != 0
    return out


def train(recipe: str, run_dir: Path, overrides: list[str]) -> None:
    """Train unless run_dir holds a finished run (raises CalledProcessError if the run fails)."""
    if (run_dir / "train_summary.json").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "code.json").exists():  # a resumed run keeps the identity it started with
        (run_dir / "code.json").write_text(json.dumps(code_identity(recipe), indent=2))
    cmd = [sys.executable, "-m", "stepdistill.cli", "train", recipe, *overrides, "eval.at_end=false",
           "train.checkpoint_every=0", "--outdir", str(run_dir), "--quiet"]
    print("#", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def fmt(name: str, k, iters, s: dict, code: str = "") -> str:
    ok = s["near_share"] >= TARGET_NEAR and s["worst_mass_error"] <= TARGET_MASS
    return (f"| {name} | {k} | {iters} | {s['energy_distance']:.4f} | {s['near_share']:.1%} | "
            f"{s['worst_mass_error']:.0%} (k={s['worst_component']}) | {'yes' if ok else 'no'} | {code} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="*", help="recipes (default: configs/toy/gmm_*.yaml but gmm_msd)")
    p.add_argument("--outdir", required=True, help="run folders go to OUTDIR/<recipe stem>")
    p.add_argument("--mixture", default=str(MIXTURE), help="overrides file of the mixture")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every recipe (key=value)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args()
    overrides = [r for r in a.recipes if "=" in r]
    if overrides:  # they would be read as recipe paths and the run would train the plain recipe
        p.error(f"{' '.join(overrides)}: give overrides after --set, e.g. --set train.lr=3e-4")

    from stepdistill.eval.domains import gmm_baseline
    from stepdistill.eval.harness import domain_score, generate_student, generate_teacher
    from stepdistill.recipe import load_recipe
    from stepdistill.run import load_run
    from stepdistill.teachers import build_teacher

    mixture = read_overrides(Path(a.mixture))
    recipes = a.recipes or default_recipes()
    out = Path(a.outdir)
    teacher = build_teacher(load_recipe(recipes[0], mixture).teacher)
    ref = teacher.sample(a.n, torch.Generator().manual_seed(1))
    rows, lines = [], ["| model | K / NFE | iterations | energy distance | near share | worst mass error | target "
                       "| code (HEAD; objective, recipe commit or +wt:working-tree blob) |",
                       "|---|---|---|---|---|---|---|---|"]

    def add(name, k, iters, x, code=""):
        s = domain_score(teacher, x, ref)
        rows.append({"model": name, "k": k, "iterations": iters, "code": code, **s})
        lines.append(fmt(name, k, iters, s, code))
        print(lines[-1], flush=True)

    if not a.no_baselines:
        mean = teacher.denoiser.means.T @ teacher.denoiser.log_w.exp()
        add("collapsed start (all at the mean)", 1, "-", mean.expand(a.n, -1).clone())
        add("one Gaussian, exact mean and covariance", "-", "-", gmm_baseline(teacher, a.n, 0))
        add("teacher, Heun", 34, "-", generate_teacher(teacher, a.n, 0, a.n, 35)[0])
    for recipe in recipes:
        run_dir = out / Path(recipe).stem
        try:
            train(recipe, run_dir, [*mixture, *a.set])
            run = load_run(run_dir)
        except Exception as err:  # noqa: BLE001  (a diverged run or one the current code cannot load: say so, go on)
            lines.append(f"| `{Path(recipe).stem}` | failed: {str(err).splitlines()[-1][:200]} |")
            print(lines[-1], flush=True)
            continue
        summary = json.loads((run_dir / "train_summary.json").read_text())
        iters = sum(s["iterations"] for s in summary.get("students", [summary]))
        c = json.loads((run_dir / "code.json").read_text()) if (run_dir / "code.json").exists() else {}
        code = f"{c['head']}; {c['objective']}, {c['recipe']}" if c else "?"
        add(f"`{Path(recipe).stem}` ({run.recipe.objective.name})", run.student.steps, iters,
            generate_student(run.student, teacher, a.n, 0, a.n), code)
    print("\n".join(["", f"{a.n} samples a side, against exact mixture samples (seed 1); mixture: {a.mixture}; "
                     f"extra overrides: {a.set or 'none'}", *lines]))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
