"""`stepdistill bench`: every objective on one teacher under one budget and one set of seeds, side by side.

A suite file (`configs/bench/*.yaml`) lists the recipes and what they share: the budget (training minutes, warm start
included, or iterations), the seeds, the step counts every student is scored at, the teacher's NFE and how often a
point of the metric-versus-time curve is taken. Each recipe and seed trains with `stepdistill train` in its own
process, one at a time by default (concurrent runs share the cores: a wall-time budget then buys fewer iterations),
or `--jobs N` at a time with cores // N threads each (the report says which), into OUTDIR/<recipe>/seed<k>; a
finished run is not retrained, so an interrupted bench resumes. The report (markdown) holds
the table, the machine it ran on, a curve plot and a sample grid per recipe.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import parallel
from .errors import InputError
from .recipe import RecipeError, build_dataclass, read_yaml

UNCAPPED = 10**7
COVERAGE = ("near_share", "worst_mass_error")  # gmm mode coverage (eval.metrics.mixture_coverage), at the trained K


@dataclass
class Suite:
    name: str
    recipes: list[str]
    minutes: float = 0.0  # training budget per run (train.max_minutes; warm start included); or
    iterations: int = 0  # iterations per run (train.iterations, with no time limit)
    seeds: list[int] = field(default_factory=lambda: [0])
    student_nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    teacher_nfe: list[int] = field(default_factory=lambda: [1, 4, 35])
    curve_every: int = 50  # iterations between curve points
    curve_n: int = 1000  # samples per curve point
    eval_n: int = 0  # samples per side for the table (0: each recipe's eval.n)


def load_suite(path: str | Path) -> Suite:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"bench suite not found: {p}")
    suite = build_dataclass(Suite, read_yaml(p), "suite")
    if (suite.minutes > 0) == (suite.iterations > 0):
        raise RecipeError(f"{p}: give exactly one budget, `minutes` (wall time) or `iterations`; got "
                          f"minutes={suite.minutes}, iterations={suite.iterations}")
    missing = [r for r in suite.recipes if not Path(r).exists()]
    if missing:
        raise RecipeError(f"{p}: recipe file(s) not found: {', '.join(missing)}")
    return suite


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} threads){gpu}; {platform.system()} "
            f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}")


def append_report(path: str | Path, text: str) -> None:
    """Append one run's section to a GPU speed report (scripts/gpu_check.py, scripts/jvp_attention_check.py), creating
    it with its title; prints the section and where it went."""
    print(text)
    report = Path(path)
    report.parent.mkdir(parents=True, exist_ok=True)
    if not report.exists():
        report.write_text("# GPU benchmarks (scripts/gpu_check.py)\n\nOne section per run, newest last.\n\n")
    with open(report, "a") as f:
        f.write(text + "\n")
    print(f"appended to {report}")


def overrides(suite: Suite, seed: int, recipe: str) -> list[str]:
    """The suite's settings as `stepdistill train` overrides. A wall-time budget lifts the recipe's iteration cap, so
    every run stops on time alone; multi-student runs split it among their students (the budget applies to each)."""
    from .recipe import load_recipe

    students = load_recipe(recipe).generator.students
    budget = [f"train.max_minutes={suite.minutes / students:g}", f"train.iterations={UNCAPPED}"] if suite.minutes else \
        [f"train.iterations={suite.iterations}", "train.max_minutes=0"]
    return [f"train.seed={seed}", *budget, f"eval.curve_every={suite.curve_every}", f"eval.curve_n={suite.curve_n}",
            *([f"eval.n={suite.eval_n}"] if suite.eval_n else [])]


def train_runs(suite: Suite, outdir: Path, quiet: bool = False, jobs: int = 1) -> list[tuple[str, int, Path]]:
    """Train every unfinished run, `jobs` at a time: with more than one, each process gets cores // jobs threads and
    writes its output to OUTDIR/<recipe>/seed<k>.log (interleaved progress bars would be unreadable)."""
    runs = [(r, s, outdir / Path(r).stem / f"seed{s}") for r in suite.recipes for s in suite.seeds]
    todo = [(i, *run) for i, run in enumerate(runs) if not (run[2] / "metrics.json").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": str(job_threads(jobs))} if jobs > 1 else None
    running: list[tuple[subprocess.Popen, Path]] = []

    def wait_one() -> None:  # the first of the running processes to end
        while (done := next((r for r in running if r[0].poll() is not None), None)) is None:
            time.sleep(1.0)
        running.remove(done)
        if done[0].returncode != 0:
            raise subprocess.CalledProcessError(done[0].returncode, done[0].args)
        if jobs > 1:
            print(f"== finished {done[1]}", flush=True)

    try:
        for i, recipe, seed, run_dir in todo:
            if len(running) >= jobs:
                wait_one()
            cmd = [sys.executable, "-m", "stepdistill.cli", "train", recipe, "--outdir", str(run_dir),
                   *overrides(suite, seed, recipe), *(["--quiet"] if quiet or jobs > 1 else [])]
            log = run_dir.parent / f"{run_dir.name}.log"
            record_jobs(run_dir, jobs)
            print(f"== [{i + 1}/{len(runs)}] training {recipe} (seed {seed}) -> {run_dir}"
                  + (f" (log: {log})" if jobs > 1 else ""), flush=True)
            if jobs > 1:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as f:  # the child keeps its own copy of the descriptor
                    running.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), run_dir))
            else:
                running.append((subprocess.Popen(cmd), run_dir))
        while running:
            wait_one()
    finally:  # a failed run stops the bench once the runs under way have finished (each resumes on a rerun)
        for proc, _ in running:
            proc.wait()
    return runs


def record_jobs(run_dir: Path, jobs: int) -> None:
    """OUTDIR/<recipe>/seed<k>.jobs.json: how many runs trained beside this one, so a later bench that only scores
    reports how the runs were trained, not its own --jobs."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    (run_dir.parent / f"{run_dir.name}.jobs.json").write_text(json.dumps({"jobs": jobs}) + "\n")


def trained_jobs(run_dirs: list[Path]) -> int | None:
    """The --jobs every run was trained with (record_jobs); None when they differ or one was not recorded."""
    found = set()
    for run_dir in run_dirs:
        path = run_dir.parent / f"{run_dir.name}.jobs.json"
        found.add(json.loads(path.read_text())["jobs"] if path.exists() else None)
    return found.pop() if len(found) == 1 else None


def concurrency(jobs: int | None) -> str:
    if jobs is None:
        return "runs trained under different or unrecorded --jobs (see each run's seed<k>.jobs.json)"
    return f"{jobs} runs at a time, {job_threads(jobs)} thread(s) each" if jobs > 1 else "one run at a time"


def job_threads(jobs: int) -> int:
    """Threads per training process when `jobs` run at once."""
    return max(1, (os.cpu_count() or 1) // jobs)


def score_run(run_dir: Path, nfes: list[int]) -> dict:
    """The run's domain metric at each NFE (its trained K from metrics.json, others generated now and cached in
    nfe_scores.json), its iterations and training time."""
    from .eval.harness import domain_metric, domain_reference, domain_score, generate_student, main_metric
    from .run import load_run

    run = load_run(run_dir, parallel.compute_device())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summary = json.loads((run_dir / "train_summary.json").read_text())
    e, k = run.recipe.eval, run.recipe.generator.steps
    key = main_metric(metrics["student"])
    cache = run_dir / "nfe_scores.json"
    by_nfe = {int(n): v for n, v in json.loads(cache.read_text()).items()} if cache.exists() else {}
    by_nfe[k] = metrics["student"][key]
    missing = [nfe for nfe in nfes if nfe not in by_nfe]
    reference = domain_reference(run.teacher, e.n, e.seed, split=e.split) if missing else None
    for nfe in missing:
        x = generate_student(run.student, run.teacher, e.n, e.seed, e.batch_size, steps=nfe)
        by_nfe[nfe] = domain_score(run.teacher, x, reference)[key]
        cache.write_text(json.dumps(by_nfe, indent=2))
    metric = domain_metric(run.teacher)
    columns = metric.columns if metric else ()  # gmm: mode coverage
    coverage = {c: metrics["student"][c] for c in columns if c in metrics["student"]}
    if len(coverage) < len(columns):  # a run scored before these were measured
        x = generate_student(run.student, run.teacher, e.n, e.seed, e.batch_size)
        score = domain_score(run.teacher, x, domain_reference(run.teacher, e.n, e.seed, split=e.split))
        coverage = {c: score[c] for c in columns}
    parts = summary.get("students", [summary])  # a multi-student run: one summary per student, trained in turn
    name = run.recipe.objective.name + (f" x {len(parts)} students" if "students" in summary else "")
    return {"objective": name, "trained_k": k, "iterations": sum(s["iterations"] for s in parts),
            "train_seconds": sum(s["train_seconds"] for s in parts), "key": key, "n": e.n,
            "student": {n: by_nfe[n] for n in sorted(set(nfes) | {k})}, "coverage": coverage}


def score_teacher(recipe_path: str, nfes: list[int], eval_n: int, outdir: Path) -> dict[int, dict]:
    """The teacher's metric at each NFE under the first recipe's protocol (its quality.json entry where the protocol
    matches exactly; otherwise sampled now and cached in OUTDIR/teacher.json)."""
    from .eval.harness import (
        cached_teacher_metrics,
        domain_reference,
        domain_score,
        generate_teacher,
        main_metric,
        protocol,
    )
    from .recipe import load_recipe
    from .teachers import build_teacher

    recipe = load_recipe(recipe_path, [f"eval.n={eval_n}"] if eval_n else [])
    teacher = build_teacher(recipe.teacher)
    cache = outdir / "teacher.json"
    done = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.exists() else {}
    for nfe in nfes:
        if nfe in done:
            continue
        r = replace(recipe, eval=replace(recipe.eval, teacher_nfe=nfe))
        e = r.eval
        score = cached_teacher_metrics(teacher, protocol(r, teacher))
        if score is None:
            print(f"== teacher at {nfe} NFE ({e.n} samples)", flush=True)
            reference = domain_reference(teacher, e.n, e.seed, split=e.split)
            x, used = generate_teacher(teacher, e.n, e.seed, e.batch_size, nfe, e.guidance_scale)
            score = {"nfe": used, **domain_score(teacher, x, reference)}
        done[nfe] = {"nfe": score["nfe"], "value": score[main_metric(score)],
                     **{c: score[c] for c in COVERAGE if c in score}}
        cache.write_text(json.dumps(done, indent=2))
    return done


def score_baseline(recipe_path: str, eval_n: int, outdir: Path) -> dict | None:
    """The domain metric's baseline (gmm: one Gaussian with the mixture's exact mean and covariance) under the first
    recipe's protocol, with its coverage (cached in OUTDIR/baseline.json); None where the domain has none."""
    from .eval.harness import domain_metric, main_metric
    from .recipe import load_recipe
    from .teachers import build_teacher

    cache = outdir / "baseline.json"
    if cache.exists():
        return json.loads(cache.read_text())
    recipe = load_recipe(recipe_path, [f"eval.n={eval_n}"] if eval_n else [])
    teacher, e = build_teacher(recipe.teacher), recipe.eval
    metric = domain_metric(teacher)
    x = None if metric is None else metric.baseline(e.n, e.seed)
    if x is None:
        return None
    score = metric.score(x, metric.reference(e.n, e.seed, split=e.split))
    out = {"value": score[main_metric(score)], **{c: score[c] for c in COVERAGE if c in score}}
    cache.write_text(json.dumps(out, indent=2))
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_curves(rows: list[dict], label: str, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    drawn = 0
    for i, r in enumerate(rows):
        pts = _read_jsonl(r["run_dir"] / "curve.jsonl")
        if not pts:
            continue
        key = next(k for k in pts[0] if k not in ("step", "time"))
        style = "-" if i < 10 else "--"
        for ax, x in zip(axes, ("time", "step")):
            ax.plot([p[x] for p in pts], [p[key] for p in pts], style, marker=".", label=r["label"])
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    for ax, xlabel in zip(axes, ("training seconds (warm start included, evaluation excluded)", "iteration")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _mean_std(values: list[float], bold: bool = False) -> str:
    m = float(np.mean(values))
    text = f"{m:.4g}" + (f" ± {np.std(values):.2g}" if len(values) > 1 else "")
    return f"**{text}**" if bold else text


def _coverage_cells(scores: list[dict]) -> str:
    """Mean near share and worst mass error over seeds, as two table cells."""
    near = np.mean([s["near_share"] for s in scores])
    err = np.mean([s["worst_mass_error"] for s in scores])
    return f"{near:.1%} | {err:.0%}"


def write_report(suite: Suite, suite_path: str, rows: list[dict], teacher: dict[int, dict], report: Path,
                 command: str, baseline: dict | None = None, jobs: int | None = 1) -> str:
    from . import registry

    key = rows[0]["key"]
    label = {"fd": "FD", "energy_distance": "energy distance"}.get(key, key.upper())
    assets = report.parent / f"{report.stem}_assets"  # files of these names are replaced, nothing else touched
    curves = plot_curves(rows, f"{label} (n={suite.curve_n})", assets / "curves.png")
    budget = f"{suite.minutes} minutes of training per run" if suite.minutes else \
        f"{suite.iterations} iterations per run"
    best_teacher = teacher[max(teacher)]["value"]
    coverage = all(r.get("coverage") for r in rows)  # gmm: mode-coverage columns
    cov_head, cov_rule = (" near share | worst mass error |", "---|---|") if coverage else ("", "")
    lines = [f"# Benchmark: {suite.name}", "",
             f"Every recipe of `{suite_path}` under one budget ({budget}, warm start included), seeds "
             f"{suite.seeds}, {concurrency(jobs)}. Made by:", "", "```bash", command, "```", "",
             f"Machine: {machine()}.", "",
             f"{label} of {rows[0]['n']} samples per side, each student scored at {suite.student_nfe} NFE whatever it "
             f"was trained for (bold: the trained step count). x teacher: at the trained step count, against the "
             f"teacher at {teacher[max(teacher)]['nfe']} NFE."
             + (" Near share (at the trained step count): samples within the radius that holds 99% of a component's "
                "exact samples (3.03 std in 2-D); worst mass error: max over components of |share - weight| / "
                "weight, samples near no component counting as lost mass (eval.metrics.mixture_coverage)."
                if coverage else ""), "",
             "| recipe | objective | trained K | iterations | train time | "
             + " | ".join(f"{label} @{n} NFE" for n in suite.student_nfe) + " |" + cov_head + " x teacher |",
             "|---|---|---|---|---|" + "---|" * len(suite.student_nfe) + cov_rule + "---|"]
    by_recipe: dict[str, list[dict]] = {}
    for r in rows:
        by_recipe.setdefault(r["recipe"], []).append(r)
    order = sorted(by_recipe, key=lambda k: np.mean([r["student"][r["trained_k"]] for r in by_recipe[k]]))
    for recipe in order:
        rs = by_recipe[recipe]
        k = rs[0]["trained_k"]
        cells = [_mean_std([r["student"][n] for r in rs], bold=n == k) for n in suite.student_nfe]
        ratio = np.mean([r["student"][k] for r in rs]) / best_teacher if best_teacher > 0 else float("nan")
        lines.append(f"| `{recipe}` | {rs[0]['objective']} | {k} | {round(np.mean([r['iterations'] for r in rs]))} | "
                     f"{np.mean([r['train_seconds'] for r in rs]) / 60:.1f} min | " + " | ".join(cells)
                     + (f" | {_coverage_cells([r['coverage'] for r in rs])}" if coverage else "")
                     + f" | {ratio:.2f} |")
    t_cov = coverage and all(all(c in t for c in COVERAGE) for t in teacher.values())
    lines += ["", "Teacher (probability-flow ODE; Euler at even NFE, Heun at odd NFE >= 3):", "",
              "| NFE asked | NFE used | " + label + " |" + (" near share | worst mass error |" if t_cov else ""),
              "|---|---|---|" + ("---|---|" if t_cov else "")]
    lines += [f"| {n} | {t['nfe']} | {t['value']:.4g} |" + (f" {_coverage_cells([t])} |" if t_cov else "")
              for n, t in sorted(teacher.items())]
    if baseline is not None:
        lines += ["", f"What the data's mean and covariance alone score: one Gaussian with the mixture's exact mean "
                  f"and covariance has {label} {baseline['value']:.4g}, near share {baseline['near_share']:.1%} and "
                  f"worst mass error {baseline['worst_mass_error']:.0%} (same protocol). A student whose {label} is "
                  "near this one may be no more than a blur over the components; the coverage columns tell."]
    covered = {r["objective"].split(" ")[0] for r in rows}
    absent = [o for o in registry.names("objective") if o not in covered]
    lines += ["", "Objectives in this suite: " + ", ".join(sorted(covered)) + "."
              + (f" Registered but not in it: {', '.join(absent)}." if absent else "")]
    if curves is not None:
        lines += ["", f"## {label} during training", "",
                  f"Seed {suite.seeds[0]}, {suite.curve_n} samples per point, a point every {suite.curve_every} "
                  "iterations (the first right after any warm start). Multi-student runs draw no curve.", "",
                  f"![{label} versus training time and iteration]({assets.name}/curves.png)"]
    cells = []
    for recipe in order:
        src = by_recipe[recipe][0]["run_dir"] / "samples" / "final.png"
        if src.exists():
            assets.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, assets / f"{recipe}.png")
            cells.append(f"`{recipe}`<br>![{recipe}]({assets.name}/{recipe}.png)")
    if cells:
        per_row = 4
        lines += ["", f"## Samples (seed {suite.seeds[0]}, final student, best first)", "",
                  "|" + " |" * per_row, "|" + "---|" * per_row]
        cells += [""] * (-len(cells) % per_row)
        lines += ["| " + " | ".join(cells[i:i + per_row]) + " |" for i in range(0, len(cells), per_row)]
    text = "\n".join(lines) + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return text


def run_bench(suite_path: str, outdir: str | Path, report: str | Path | None = None, quiet: bool = False,
              jobs: int = 1) -> Path:
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: give 1 or more training processes at a time")
    if report is not None and (Path(report).suffix != ".md" or Path(report).is_dir()):
        raise InputError(f"--report {report}: give a markdown file path ending in .md")
    suite = load_suite(suite_path)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    runs = train_runs(suite, outdir, quiet, jobs)
    rows = []
    for recipe, seed, run_dir in runs:
        print(f"== scoring {run_dir} at {suite.student_nfe} NFE", flush=True)
        rows.append({"recipe": Path(recipe).stem, "seed": seed, "run_dir": run_dir,
                     "label": f"{Path(recipe).stem}", **score_run(run_dir, suite.student_nfe)})
    teacher = score_teacher(suite.recipes[0], suite.teacher_nfe, suite.eval_n, outdir)
    baseline = score_baseline(suite.recipes[0], suite.eval_n, outdir)
    report = Path(report) if report else outdir / "report.md"
    trained = trained_jobs([run_dir for _, _, run_dir in runs])  # a rerun that only scores: how they were trained
    shown = trained or jobs
    command = f"stepdistill bench {suite_path} --outdir {outdir} --report {report}" + (
        f" --jobs {shown}" if shown > 1 else "")
    write_report(suite, suite_path, rows, teacher, report, command, baseline, trained)
    (outdir / "bench.json").write_text(json.dumps([{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}
                                                   for r in rows], indent=2))
    return report
