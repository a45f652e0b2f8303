"""Check the seed papers' small-scale claims on the analytic Gaussian-mixture teacher, one subcommand per claim.

Each subcommand trains its runs one at a time (skipping a run whose OUTDIR/<claim>/<run>/train_summary.json exists),
scores the EMA student on N samples (seed 0) against N exact mixture samples (seed 1) and prints a markdown table; the
rows also go to OUTDIR/<claim>/rows.json. The reference samples only score: no setting is chosen on them.

    OMP_NUM_THREADS=1 python scripts/gmm_claims.py sid_alpha    --outdir runs/claims   # SiD alpha on ring8
    OMP_NUM_THREADS=1 python scripts/gmm_claims.py disback      --outdir runs/claims   # DisBack vs VSD, early curve
    OMP_NUM_THREADS=1 python scripts/gmm_claims.py asd_steps    --outdir runs/claims   # ASD at 1, 2, 4 NFE
    OMP_NUM_THREADS=1 python scripts/gmm_claims.py snoopi       --outdir runs/claims   # random vs fixed guidance
    OMP_NUM_THREADS=1 python scripts/gmm_claims.py fdiv         --outdir runs/claims   # JS / KL / reverse KL on ring8

Common options: --seeds (train.seed values), --iterations (train.iterations), --n (samples a side), --set (extra
overrides).
Metrics (stepdistill/eval/metrics.py mixture_coverage, energy_distance):
  ED      energy distance to the exact mixture (lower is better)
  near    share of samples within 3.035 std (the 99% radius in 2-D) of some component mean (exact samples: ~99%)
  worst   worst relative component mass error max_k |mass_k - w_k| / w_k (exact samples: a few %)
  hit     components holding at least half their weight (mass_k >= w_k / 2), of K
  coarse worst  as worst, but every sample counted for its nearest mean, however far (mass split by region, not by
          sharpness: a blurry student that puts the right mass around each mode reads low here)
  coarse hit    components whose nearest-mean region holds at least half their weight, of K
  r/std   mean distance of the near samples to their nearest mean, in component stds (exact 2-D samples: ~1.24;
          lower = sharper than the teacher, higher = blurrier): the fidelity read of a sample that covers a mode
Each run folder gets code.json: HEAD and, for the objective file the run used, its last commit and whether the
working tree differed from it (the checkout is shared and edited while these run) plus the file's blob hash.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from gmm_coverage import MIXTURE, read_overrides, train  # noqa: E402  (reused: one run per call, skipped when done)

RING8 = read_overrides(MIXTURE)
CONFIGS = ROOT / "configs/toy"


# ---- bookkeeping -------------------------------------------------------------------------------------------------
def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def code_identity(objective: str) -> dict:
    f = f"stepdistill/objectives/{objective}.py"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", f], cwd=ROOT).returncode != 0
    return {"head": _git("rev-parse", "--short", "HEAD"), "objective_file": f,
            "objective_commit": _git("log", "-1", "--format=%h", "--", f), "objective_dirty": dirty,
            "objective_blob": _git("hash-object", f)[:10]}


def run_one(recipe: str, run_dir: Path, overrides: list[str], objective: str) -> str | None:
    """Train (unless finished); returns None, or the error's last line when the run failed (divergence etc.)."""
    if not (run_dir / "train_summary.json").exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "code.json").write_text(json.dumps(code_identity(objective), indent=2))
    try:
        train(str(Path(recipe).relative_to(ROOT)) if Path(recipe).is_absolute() else recipe, run_dir, overrides)
    except subprocess.CalledProcessError as e:
        return f"failed (exit {e.returncode})"
    return None


def code_note(run_dir: Path) -> str:
    p = run_dir / "code.json"
    if not p.exists():
        return "?"
    c = json.loads(p.read_text())
    return f"{c['objective_commit']}{'+wt:' + c['objective_blob'][:7] if c['objective_dirty'] else ''}"


# ---- scoring -----------------------------------------------------------------------------------------------------
def score(run_dir: Path, n: int, steps: int | None = None) -> dict:
    from stepdistill.eval.domains import mixture_of
    from stepdistill.eval.harness import domain_score, generate_student
    from stepdistill.run import load_run

    run = load_run(run_dir)
    teacher = run.teacher
    ref = teacher.sample(n, torch.Generator().manual_seed(1))
    x = generate_student(run.student, teacher, n, 0, n, steps=steps)
    s = domain_score(teacher, x, ref)
    means, std, w = mixture_of(teacher)
    s.update(extra_metrics(x, means, std, w, s))
    s["finite"] = bool(torch.isfinite(x).all())
    s["iterations"] = run.step
    return s


def extra_metrics(x: torch.Tensor, means, std: float, w, s: dict) -> dict:
    from stepdistill.eval.metrics import near_radius

    x = x.double().reshape(len(x), -1).nan_to_num(1e6)
    mu = means.double()
    d = torch.cdist(x, mu)
    dmin, _ = d.min(1)
    near = dmin <= near_radius(mu.shape[1]) * std
    w = (w / w.sum()).double()
    mass = torch.tensor(s["component_mass"], dtype=torch.float64)
    coarse = torch.bincount(d.argmin(1), minlength=len(mu)).double() / len(x)  # every sample to its nearest mean
    err = (coarse - w).abs() / w
    return {"r_over_std": float(dmin[near].mean() / std) if near.any() else float("nan"),
            "hit": int((mass >= w / 2).sum()), "k": len(mu), "coarse_worst": float(err.max()),
            "coarse_hit": int((coarse >= w / 2).sum()),
            "coarse_mass": [float(m) for m in coarse]}


def exact_r_over_std(n: int, overrides: list[str]) -> float:
    """r/std of exact mixture samples (the value a perfect student reads), on the recipe's mixture."""
    from stepdistill.eval.domains import mixture_of
    from stepdistill.eval.harness import domain_score
    from stepdistill.recipe import load_recipe
    from stepdistill.teachers import build_teacher

    teacher = build_teacher(load_recipe(str(CONFIGS / "gmm_vsd.yaml"), overrides).teacher)
    x = teacher.sample(n, torch.Generator().manual_seed(2))
    s = domain_score(teacher, x, teacher.sample(n, torch.Generator().manual_seed(1)))
    return extra_metrics(x, *mixture_of(teacher), s)["r_over_std"], s


HEAD = "| run | seed | iters | ED | near | worst (k) | hit | r/std | coarse worst | coarse hit | code |"
SEP = "|---|---|---|---|---|---|---|---|---|---|---|"


def row(name: str, seed, s: dict, code: str = "") -> str:
    if "error" in s:
        return f"| {name} | {seed} | - | {s['error']} | | | | | | | {code} |"
    return (f"| {name} | {seed} | {s['iterations']} | {s['energy_distance']:.4f} | {s['near_share']:.1%} | "
            f"{s['worst_mass_error']:.0%} ({s['worst_component']}) | {s['hit']}/{s['k']} | {s['r_over_std']:.2f} | "
            f"{s['coarse_worst']:.0%} | {s['coarse_hit']}/{s['k']} | {code} |")


def mean_sd(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4g}"
    return f"{statistics.mean(vals):.4g} ± {statistics.stdev(vals):.2g}"


def summarise(groups: dict[str, list[dict]], keys=("energy_distance", "near_share", "worst_mass_error", "hit",
                                                     "r_over_std", "coarse_worst", "coarse_hit")) -> list[str]:
    lines = ["| setting | runs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for name, rows in groups.items():
        ok = [r for r in rows if "error" not in r]
        lines.append(f"| {name} | {len(ok)}/{len(rows)} | " + " | ".join(mean_sd([r[k] for r in ok]) for k in keys)
                     + " |")
    return lines


def grid(claim: str, a, settings: list[tuple[str, str, list[str], str]], steps_at: list[int | None] | None = None,
         mixture: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """settings: (name, recipe, overrides, objective module); one run per (setting, seed)."""
    out = Path(a.outdir) / claim
    rows, lines = [], [HEAD, SEP]
    for name, recipe, ov, obj in settings:
        for seed in a.seeds:
            run_dir = out / f"{name}_s{seed}".replace("/", "_").replace(" ", "")
            iterations_ov = [f"train.iterations={a.iterations}"] if a.iterations else []
            err = run_one(recipe, run_dir, [*(mixture or []), *ov, *iterations_ov, f"train.seed={seed}", *a.set], obj)
            for k in steps_at or [None]:
                label = name if k is None else f"{name} @{k} NFE"
                try:
                    s = {"error": err} if err else score(run_dir, a.n, k)
                except Exception as e:  # noqa: BLE001  (a run that left no loadable checkpoint)
                    s = {"error": f"{type(e).__name__}: {e}"[:80]}
                rows.append({"setting": label, "seed": seed, "run": str(run_dir), "code": code_note(run_dir), **s})
                lines.append(row(label, seed, s, code_note(run_dir)))
                print(lines[-1], flush=True)
    return rows, lines


def finish(claim: str, a, rows: list[dict], lines: list[str], extra: list[str] | None = None) -> None:
    out = Path(a.outdir) / claim
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["setting"], []).append(r)
    text = ["", f"## {claim}: {a.n} samples a side vs exact mixture samples (seed 1); seeds {a.seeds}; "
            f"train.iterations={a.iterations or 'recipe'}; extra overrides {a.set or 'none'}", *lines, "",
            "mean ± sd over seeds:", *summarise(groups), *(extra or [])]
    print("\n".join(text))
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text("\n".join(text) + "\n")


# ---- claims ------------------------------------------------------------------------------------------------------
def sid_alpha(a) -> None:
    """SiD: alpha trades fidelity (r/std, near) for coverage (worst, hit). ring8 (unequal weights, std 0.1)."""
    recipe = str(CONFIGS / "gmm_sid.yaml")
    settings = [(f"alpha={al}", recipe, [f"objective.alpha={al}"], "sid") for al in a.values or [0.5, 1.0, 1.2, 1.5]]
    rows, lines = grid("sid_alpha", a, settings, mixture=[] if a.toy else RING8)
    r, s = exact_r_over_std(a.n, [] if a.toy else RING8)
    finish("sid_alpha", a, rows, lines, ["", f"exact mixture samples: r/std {r:.3f}, near {s['near_share']:.1%}, "
                                         f"worst {s['worst_mass_error']:.0%}"])


def fdiv(a) -> None:
    """f-distill: JS and forward KL cover modes better than reverse KL, on ring8."""
    recipe = str(CONFIGS / "gmm_fdiv_js.yaml")
    settings = [(d, recipe, ["objective.name=fdiv", f"objective.divergence={d}"], "fdiv")
                for d in a.values or ["js", "kl", "rkl"]]
    rows, lines = grid("fdiv", a, settings, mixture=[] if a.toy else RING8)
    finish("fdiv", a, rows, lines)


def asd_steps(a) -> None:
    """ASD: one 2-step student good at 1, 2 and 4 NFE, vs the plain 2-step VSD student and asd_weight=0."""
    settings = [("asd", str(CONFIGS / "gmm_asd_2step.yaml"), [], "asd"),
                ("asd_w0", str(CONFIGS / "gmm_asd_2step.yaml"), ["objective.asd_weight=0"], "asd"),
                ("vsd_2step", str(CONFIGS / "gmm_vsd_2step.yaml"), [], "vsd")]
    rows, lines = grid("asd_steps", a, settings, steps_at=[1, 2, 4], mixture=RING8 if a.ring8 else [])
    finish("asd_steps", a, rows, lines)


def snoopi(a) -> None:
    """SNOOPI PG-SB: random guidance scale ~ U[lo, hi] vs fixed scales, SwiftBrush weighting, conditional teacher."""
    base = ["teacher.conditional=true", "objective.weighting=swiftbrush"]
    lo, hi = a.range
    settings = [(f"fixed_s={s}", str(CONFIGS / "gmm_vsd.yaml"), [*base, f"objective.guidance_scale={s}"], "vsd")
                for s in a.values or [2.0, 4.0, 8.0]]
    settings.append((f"random_U[{lo},{hi}]", str(CONFIGS / "gmm_vsd.yaml"),
                     [*base, f"objective.guidance_range=[{lo},{hi}]"], "vsd"))
    rows, lines = grid("snoopi", a, settings)
    finish("snoopi", a, rows, lines)


def disback(a) -> None:
    """DisBack vs plain VSD: metric at fixed early iterations (eval.curve_every points of the EMA student)."""
    every = a.curve_every
    settings = [("vsd", str(CONFIGS / "gmm_vsd.yaml"), [f"eval.curve_every={every}", f"eval.curve_n={a.n}"], "vsd"),
                ("disback", str(CONFIGS / "gmm_disback.yaml"),
                 [f"eval.curve_every={every}", f"eval.curve_n={a.n}"], "disback")]
    out = Path(a.outdir) / "disback"
    mixture = RING8 if a.ring8 else []
    rows, curves = [], {}
    for name, recipe, ov, obj in settings:
        for seed in a.seeds:
            run_dir = out / f"{name}_s{seed}"
            err = run_one(recipe, run_dir, [*mixture, *ov, f"train.iterations={a.iterations or 2000}",
                                            f"train.seed={seed}", *a.set], obj)
            lines_ = [] if err else (run_dir / "curve.jsonl").read_text().splitlines()
            pts = [json.loads(line) for line in lines_ if line]
            curves[(name, seed)] = pts
            for p in pts:
                rows.append({"setting": name, "seed": seed, "code": code_note(run_dir), **p})
    have = sorted({p["step"] for pts in curves.values() for p in pts})
    steps = [s for s in have if s in set(a.columns)] if a.columns else have
    lines = []
    for key, label, f in [("energy_distance", "energy distance", "{:.4f}"), ("near_share", "near share", "{:.1%}"),
                          ("worst_mass_error", "worst mass error", "{:.0%}")]:
        lines += ["", f"{label} of the EMA student at iteration (curve points, {a.n} samples, seed 0 vs exact seed 1):",
                  "| run | seed | code | " + " | ".join(str(s) for s in steps) + " |",
                  "|---|---|---|" + "---|" * len(steps)]
        for (name, seed), pts in curves.items():
            by = {p["step"]: p for p in pts}
            code = code_note(out / f"{name}_s{seed}")
            lines.append(f"| {name} | {seed} | {code} | " + " | ".join(f.format(by[s][key]) if s in by else "-"
                                                                          for s in steps) + " |")
    text = ["", f"## disback vs vsd; seeds {a.seeds}; train.iterations={a.iterations or 2000}; mixture "
            f"{'ring8' if a.ring8 else 'recipe (4 equal, std 0.2)'}; extra overrides {a.set or 'none'}", *lines]
    print("\n".join(text))
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text("\n".join(text) + "\n")


CLAIMS = {"sid_alpha": sid_alpha, "fdiv": fdiv, "asd_steps": asd_steps, "snoopi": snoopi, "disback": disback}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("claim", choices=CLAIMS)
    p.add_argument("--outdir", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--iterations", "--steps", dest="iterations", type=int, default=None,
                   help="train.iterations (default: each claim's recipe; --steps is its old name)")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    p.add_argument("--values", nargs="*", type=lambda v: float(v) if v[0].isdigit() else v, default=None,
                   help="sid_alpha: alphas; fdiv: divergences; snoopi: fixed scales")
    p.add_argument("--range", type=float, nargs=2, default=[2.0, 8.0], help="snoopi: guidance_range")
    p.add_argument("--toy", action="store_true", help="sid_alpha/fdiv: the recipe's 4-component mixture, not ring8")
    p.add_argument("--ring8", action="store_true", help="asd_steps/disback: on ring8 instead of the recipe's mixture")
    p.add_argument("--curve-every", type=int, default=100)
    p.add_argument("--columns", type=int, nargs="*", default=[0, 100, 200, 300, 400, 500, 700, 1000, 1200, 1500, 2000],
                   help="disback: curve iterations shown (DisBack's generator is frozen for its first "
                   "record_iterations)")
    a = p.parse_args()
    torch.set_num_threads(1)
    CLAIMS[a.claim](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
