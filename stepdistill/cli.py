"""`stepdistill` command line: train | sample | eval | export."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EPILOG = {
    "train": """examples:
  stepdistill train configs/fashion/vsd_1step.yaml --outdir runs/fashion_vsd
  stepdistill train configs/toy/gmm_vsd.yaml train.steps=300 'teacher.means=[[0,2],[2,0]]' --outdir runs/gmm
  stepdistill train configs/toy/gmm_vsd.yaml --dry-run
  stepdistill train configs/toy/gmm_msd.yaml --outdir runs/gmm_msd      (multi-student: one run per student)
Rerunning the same command resumes from the newest intact checkpoint in --outdir.""",
    "sample": """examples:
  stepdistill sample --run runs/fashion_vsd --n 100 --out grid.png
  stepdistill sample --run runs/fashion_vsd --n 64 --steps 1 --seed 3 --out samples/   (a folder of PNGs)
  stepdistill sample --run runs/gmm --n 4096 --out gmm.npy                             (vectors: an (N, D) array)""",
    "eval": """examples:
  stepdistill eval --run runs/fashion_vsd
  stepdistill eval --run runs/fashion_vsd eval.n=2000 --recompute-teacher""",
    "export": """examples:
  stepdistill export --run runs/fashion_vsd --format diffusers --out exports/fashion_1step
  stepdistill export --run runs/fashion_vsd --format safetensors --out exports/fashion_1step.safetensors""",
}


def _parser() -> argparse.ArgumentParser:
    from . import registry

    p = argparse.ArgumentParser(prog="stepdistill", description="Distil many-step diffusion models into one- and "
                                "few-step generators.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"objectives: {', '.join(registry.names('objective'))}\n"
                                       f"teachers: {', '.join(registry.names('teacher'))}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, epilog=EPILOG[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    t = add("train", "distil a teacher into a few-step student (rerun to resume)")
    t.add_argument("recipe", help="YAML recipe, e.g. configs/fashion/vsd_1step.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML (train.steps=200)")
    t.add_argument("--outdir", help="run folder (recipe.yaml, stats.jsonl, checkpoints/, samples/, metrics.json)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the networks, then stop")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    s = add("sample", "generate samples from a trained run")
    s.add_argument("--run", required=True, help="run folder written by `stepdistill train`")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--steps", type=int, default=None, help="generator steps (default: the trained K)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="PATH.png (grid), a folder (one PNG each), or PATH.npy (vectors)")
    s.add_argument("--batch-size", type=int, default=500, help="samples per forward pass; noise is drawn per batch as "
                   "diffusers' LCMScheduler draws it, so a batch matches a pipeline call with the same seed")

    e = add("eval", "evaluate student and teacher; rewrites RUN/metrics.json")
    e.add_argument("--run", required=True)
    e.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.n=2000")
    e.add_argument("--recompute-teacher", action="store_true", help="ignore the teacher's cached quality.json entry")
    e.add_argument("--quiet", action="store_true")

    x = add("export", "export the student's weights")
    x.add_argument("--run", required=True)
    x.add_argument("--format", choices=["safetensors", "diffusers"], required=True)
    x.add_argument("--out", required=True)
    return p


def cmd_train(a: argparse.Namespace) -> int:
    from .recipe import dump, load_recipe
    from .train.trainer import build, train

    recipe = load_recipe(a.recipe, a.overrides)
    if a.dry_run:
        print(dump(recipe))
        built = build(recipe)
        for role in ("teacher", "generator", "fake_score"):
            net = getattr(built.nets, role)
            if net is not None:
                n = sum(p.numel() for p in net.parameters())
                print(f"# {role}: {type(net).__name__}, {n / 1e6:.2f}M parameters")
        print(f"# objective {recipe.objective.name}: trains {', '.join(built.objective.trains)}")
        if recipe.generator.students > 1:
            from .models.multi_student import describe, partition

            groups = partition(built.teacher.num_classes, recipe.generator.students)
            print(f"# {len(groups)} students, one run each in OUTDIR/students/k/: "
                  + "; ".join(f"{k}: {describe(c)}" for k, c in enumerate(groups)))
        return 0
    if not a.outdir:
        raise SystemExit("stepdistill train: --outdir is required (unless --dry-run)")
    from .eval.harness import format_table

    start = time.time()
    metrics = train(recipe, a.outdir, quiet=a.quiet)
    holds = ("students/k/ (one run per student), samples/final.png, metrics.json" if recipe.generator.students > 1
             else "samples/final.png, metrics.json, stats.jsonl")
    print(f"\nrun folder: {a.outdir}  ({holds})")
    if metrics is not None:
        print(format_table(metrics))
    print(f"total time: {time.time() - start:.0f} s")
    return 0


def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np

    from .eval.harness import generate_student
    from .eval.visual import save_grid, to_uint8
    from .run import load_run

    run = load_run(a.run)
    x = generate_student(run.student, run.teacher, a.n, a.seed, batch_size=a.batch_size, steps=a.steps)
    out = Path(a.out)
    if not run.teacher.is_image:
        if out.suffix != ".npy":
            raise SystemExit(f"vector samples are written as .npy; got --out {out}")
        np.save(out, x.numpy())
    elif out.suffix == ".png":
        save_grid(x, out, nrow=10)
    elif out.suffix:
        raise SystemExit(f"--out must end in .png (a grid) or name a folder; got {out}")
    else:
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(to_uint8(x)):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out / f"{i:05d}.png")
    print(f"wrote {a.n} samples ({run.student.steps if a.steps is None else a.steps} steps, seed {a.seed}) to {out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from . import recipe as recipe_mod
    from .eval.harness import evaluate, format_table, write_metrics
    from .run import load_run

    run = load_run(a.run)
    bad = [o for o in a.overrides if not o.startswith("eval.")]
    if bad:
        raise SystemExit(f"stepdistill eval only takes eval.* overrides, got {bad}")
    recipe = recipe_mod.load_recipe(data=recipe_mod.to_dict(run.recipe), overrides=a.overrides)
    metrics = evaluate(recipe, run.teacher, run.student, quiet=a.quiet, recompute_teacher=a.recompute_teacher)
    path = write_metrics(run.path, metrics)
    print(format_table(metrics))
    print(f"wrote {path}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_diffusers, export_safetensors
    from .run import load_run

    run = load_run(a.run)
    out = export_safetensors(run, a.out) if a.format == "safetensors" else export_diffusers(run, a.out)
    print(f"exported {a.format} to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .recipe import RecipeError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train r.yaml --outdir x train.steps=9`), which argparse leaves over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export}[args.command](args)
    except (RecipeError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"stepdistill {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

