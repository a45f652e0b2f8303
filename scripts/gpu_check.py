"""GPU check: SD1.5- and SDXL-size networks, one `vsd` and one `sid` training step in bf16 per attention backend.

For each size (a randomly initialised UNet2DConditionModel built from SD1.5's / SDXL's config: teachers/synthetic.py),
objective and backend (sdpa; xformers when importable; sdpa + torch.compile) it builds the real Trainer on the GPU
(train.precision=bf16 autocast with float32 master weights, train.teacher_dtype=bf16), times training iterations
and reports images per second, peak memory (torch.cuda.max_memory_allocated), the achieved bf16 TFLOP/s as a fraction
of the card's dense peak (FLOPs of one iteration counted by torch.utils.flop_counter.FlopCounterMode), and the loop's
overhead ratio (stepdistill/speed.py: step time / its network passes replayed alone), beside the peak that
`stepdistill plan` predicts for the same recipe on meta tensors (its error against the measured peak checks the
planner on a real card). A VSD iteration here has
update_ratio 1 (a generator and a fake-score update every iteration). The markdown section, naming the card, is
appended to docs/benchmarks_gpu.md (--report).

On a machine with CUDA torch but without this project's other dependencies (diffusers, peft, accelerate, ...):
carry their wheels in a folder and install them first, from this repository's root:

    # where pip can reach PyPI (x86-64 Linux wheels for the GPU machine's Python, here 3.12):
    python3 -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        --platform manylinux_2_17_x86_64 -d wheels/ diffusers peft accelerate safetensors pyyaml tqdm tensorboard
    # on the GPU machine:
    python3 -m pip install --no-index --find-links wheels/ --no-deps --target /tmp/site wheels/*.whl
    export PYTHONPATH=$PWD:/tmp/site
    python3 scripts/gpu_check.py                          # sd15 and sdxl, vsd and sid, every backend (~10 min)
    python3 scripts/gpu_check.py --sizes sd15 --backends sdpa --steps 3    # a quick look

(torch itself must not come from the wheels folder: keep the machine's CUDA build; xformers, if wanted, must match it.)
On a CPU, `--tiny` runs the same code on test-size networks in seconds (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.bench import append_report, machine  # noqa: E402
from stepdistill.kernels import xformers_status  # noqa: E402
from stepdistill.recipe import load_recipe  # noqa: E402
from stepdistill.speed import measure  # noqa: E402

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from NVIDIA's data sheets; matched in order on the device name
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.0), ("A10G", 70.0)]
BATCH = {"sd15": 8, "sdxl": 2, "tiny": 4, "tiny-xl": 4}
BACKENDS = ("sdpa", "xformers", "compile")


def card_peak(name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def recipe_for(size: str, objective: str, backend: str, batch: int, checkpointing: bool, bf16: bool):
    obj = {"name": objective, **({"update_ratio": 1} if objective == "vsd" else {})}
    train = {"batch_size": batch, "precision": "bf16" if bf16 else "fp32", "teacher_dtype": "bf16" if bf16 else "fp32",
             "attention": "sdpa" if backend == "compile" else backend, "compile": backend == "compile",
             "gradient_checkpointing": checkpointing}
    return load_recipe(None, data={"teacher": {"name": "synthetic-unet", "size": size}, "objective": obj,
                                   "train": train, "eval": {"at_end": False}})


def count_flops(trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
        trainer.step += 1
    return float(counter.get_total_flops())


def planned_peak(recipe, device: torch.device) -> int | None:
    """`stepdistill plan`'s per-GPU peak for the recipe on one card (memory only; None if the planner fails, which
    must not cost the measured row)."""
    from stepdistill.plan import plan

    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 80 * 2**30
    try:
        return plan(recipe, gpus=1, gpu_memory=memory, flops=False).peak
    except Exception:
        traceback.print_exc()
        return None


def check(size: str, objective: str, backend: str, a, flops_cache: dict) -> dict:
    from stepdistill.training.trainer import Trainer

    row = {"size": size, "objective": objective, "backend": backend}
    if backend == "xformers" and xformers_status(a.device) is not None:
        return {**row, "note": f"skipped: {xformers_status(a.device)}"}
    batch = a.batch or BATCH[size]
    try:
        recipe = recipe_for(size, objective, backend, batch, a.gradient_checkpointing, not a.fp32)
        row["planned"] = planned_peak(recipe, a.device)
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            with torch.device(a.device):  # build the random networks on the GPU (the CPU takes minutes for SDXL);
                trainer = Trainer(recipe, Path(tmp) / "run", quiet=True)  # training steps run as a user's would
            if (size, objective) not in flops_cache and backend != "compile":
                flops_cache[(size, objective)] = count_flops(trainer)  # same maths for every backend
            r = measure(trainer, a.iterations, a.warmup, f"{size}/{objective}")
        step_s = r.step_ms / 1e3
        flops = flops_cache.get((size, objective))
        row.update(batch=batch, step_ms=r.step_ms, images_per_s=batch / step_s, ratio=r.ratio, peak=r.peak_memory,
                   tflops=flops / step_s / 1e12 if flops else None)
    except torch.cuda.OutOfMemoryError:
        row["note"] = f"out of memory at batch {batch}"
    except Exception as e:  # one failing configuration (a compile error, say) must not lose the others' rows
        traceback.print_exc()
        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    finally:
        trainer = None  # noqa: F841  (free the networks before the next configuration)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def markdown(rows: list[dict], card: str, peak: float | None, command: str, a) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    peak_text = f"{peak:g} TFLOP/s" if peak else "unknown for this card (--peak-tflops)"
    precision = "fp32" if a.fp32 else "bf16 autocast, float32 master weights, teacher weights bf16"
    lines = [f"## {card} ({when})", "", f"Machine: {machine()}.", "", "```bash", command, "```", "",
             f"{precision}; gradient checkpointing {'on' if a.gradient_checkpointing else 'off'}; {a.iterations} timed "
             f"iterations after {a.warmup} warm-up ones. VSD with update_ratio 1 (generator and fake score update "
             f"every iteration). Peak bf16 dense: {peak_text}.",
             "", "| size | objective | attention | batch | step ms | images/s | peak memory | planned peak | "
             "plan error | TFLOP/s | of peak | overhead ratio |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['size']} | {r['objective']} | {r['backend']} | {r['note']} |||||||||")
            continue
        mem = f"{r['peak'] / 2**30:.2f} GiB" if r["peak"] is not None else "n/a (CPU)"
        planned = f"{r['planned'] / 2**30:.2f} GiB" if r["planned"] is not None else "failed"
        error = f"{100 * (r['planned'] / r['peak'] - 1):+.1f}%" if r["planned"] and r["peak"] else "n/a"
        tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else "n/a"
        frac = f"{100 * r['tflops'] / peak:.1f}%" if r["tflops"] is not None and peak else "n/a"
        lines.append(f"| {r['size']} | {r['objective']} | {r['backend']} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{r['images_per_s']:.2f} | {mem} | {planned} | {error} | {tf} | {frac} | {r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl", "tiny", "tiny-xl"])
    p.add_argument("--objectives", nargs="+", default=["vsd", "sid"])
    p.add_argument("--backends", nargs="+", choices=BACKENDS,
                   help="default: all (with --tiny: sdpa and xformers; compiling a UNet takes minutes on a CPU)")
    p.add_argument("--batch", type=int, default=0, help=f"images per iteration (default per size: {BATCH})")
    p.add_argument("--iterations", "--steps", dest="iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 (CPUs: bf16 autocast there is slow)")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, when it is not in the table")
    p.add_argument("--tiny", action="store_true", help="test-size networks (sizes tiny and tiny-xl); runs on a CPU")
    p.add_argument("--report", default="docs/benchmarks_gpu.md", help="markdown file the section is appended to")
    p.add_argument("--flops-cache", help="JSON file of FLOPs per (size, objective), read and written: a compile "
                                         "run reuses an eager run's counts (compiled networks are not counted)")
    a = p.parse_args(argv)
    a.backends = a.backends or (["sdpa", "xformers"] if a.tiny else list(BACKENDS))
    if a.tiny:
        a.sizes = [s for s in a.sizes if s.startswith("tiny")] or ["tiny", "tiny-xl"]
    elif not torch.cuda.is_available():
        p.error("no CUDA device: this check is for GPU machines (use --tiny to try it on a CPU)")
    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else "CPU (no GPU)"
    peak = a.peak_tflops or (card_peak(card) if a.device.type == "cuda" else None)
    cache_file = Path(a.flops_cache) if a.flops_cache else None
    flops_cache = {tuple(k.split("/")): v for k, v in json.loads(cache_file.read_text()).items()} \
        if cache_file and cache_file.exists() else {}
    # a time limit (device_check.sh's `timeout`) sends SIGTERM: leave through `finally` and write the rows made so far
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    configs = [(s, o, b) for s in a.sizes for o in a.objectives for b in a.backends]
    rows = []
    try:
        for size, objective, backend in configs:
            print(f"== {size} {objective} {backend}", flush=True)
            rows.append(check(size, objective, backend, a, flops_cache))
            print(rows[-1], flush=True)
            if cache_file:
                cache_file.write_text(json.dumps({"/".join(k): v for k, v in flops_cache.items()}))
    finally:
        signal.signal(signal.SIGTERM, previous)
        write_report(rows, len(configs), card, peak, argv, a)
    return 0


def write_report(rows: list[dict], planned: int, card: str, peak: float | None, argv, a) -> None:
    command = "python scripts/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, card, peak, command, a)
    if len(rows) < planned:
        text += f"\nStopped (time limit or interrupt) after {len(rows)} of {planned} configurations.\n"
    append_report(a.report, text)


if __name__ == "__main__":
    sys.exit(main())
