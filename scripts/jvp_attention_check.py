"""GPU timing of sCM's JVP attention: the Triton kernel (kernels/jvp_attention.py) against SDPA's math backend.

Two kinds of rows, appended as a markdown section to the GPU speed report (--report, docs/benchmarks_gpu.md):

- attention: one attention layer's forward-mode JVP (O and dO from q, k, v and their tangents, torch.func.jvp as sCM
  runs it) at the largest sequence length of each family: SD1.5 at 512 px (64x64 latents: 4096 tokens, 8 heads of
  40), SDXL at 1024 px (its first attention level: 4096 tokens, 10 heads of 64), SANA at 4096 px (128x128 latents:
  16384 image tokens on 300 text tokens, 70 heads of 32: SANA's self-attention is linear, its cross-attention is
  softmax), and a 16384-token self-attention (16 heads of 64: a DiT at 2K) where the math path's quadratic memory
  shows. float32 (sCM computes its JVP in float32) and bfloat16.
- unet: a whole JVP pass of a randomly initialised SD1.5 / SDXL UNet (teachers/synthetic.py layouts), float32, with
  `forward_ad_ready(net, flash=...)` as sCM's `objective.jvp=flash` / `forward` run it.

Each row: milliseconds per JVP, tokens per second (batch x query tokens / time), peak memory above what the inputs
and weights hold (torch.cuda.max_memory_allocated), and the kernel's largest error against the math path relative to
the largest |dO| (where the math path fits). A configuration that runs out of memory is a row that says so.

    python scripts/jvp_attention_check.py                      # on a GPU machine (scripts/device_check.sh runs it)
    TRITON_INTERPRET=1 python scripts/jvp_attention_check.py --tiny   # the same code on tiny shapes, on a CPU
"""
from __future__ import annotations

import argparse
import datetime
import gc
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.bench import append_report, machine  # noqa: E402

# name: (batch, heads, query tokens, key tokens, head dim)
ATTENTION = {
    "sd15 self 512px": (8, 8, 4096, 4096, 40),
    "sdxl self 1024px": (2, 10, 4096, 4096, 64),
    "sana cross 4096px": (1, 70, 16384, 300, 32),
    "dit self 16k tokens": (1, 16, 16384, 16384, 64),
}
TINY_ATTENTION = {"tiny self": (1, 2, 40, 40, 32), "tiny cross": (1, 2, 40, 7, 64)}
UNET_BATCH = {"sd15": 4, "sdxl": 1, "tiny": 1}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps: int, warmup: int) -> tuple[float, int | None, object]:
    """(ms per call, peak bytes above the memory held before, the last result)."""
    for _ in range(warmup):
        out = fn()
    sync()
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    sync()
    ms = (time.perf_counter() - start) / steps * 1e3
    return ms, (torch.cuda.max_memory_allocated() - base) if cuda else None, out


def attention_rows(name, shape, dtype_name, a) -> list[dict]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stepdistill.kernels.jvp_attention import attention

    b, h, nq, nk, d = shape
    g = torch.Generator(a.device).manual_seed(0)
    dtype = DTYPES[dtype_name]
    q, dq = (torch.randn(b, h, nq, d, device=a.device, generator=g, dtype=dtype) for _ in range(2))
    k, v, dk, dv = (torch.randn(b, h, nk, d, device=a.device, generator=g, dtype=dtype) for _ in range(4))

    def math():
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))

    def kernel():
        return torch.func.jvp(attention, (q, k, v), (dq, dk, dv))

    rows, tangents = [], {}
    for backend, fn in (("kernel", kernel), ("math", math)):
        row = {"kind": "attention", "name": name, "shape": f"{b}x{h}x{nq}x{nk}x{d}", "dtype": dtype_name,
               "backend": backend}
        rows.append(measure(row, fn, b * nq, a, tangents))
    add_error(rows, tangents)
    return rows


def unet_rows(size, a) -> list[dict]:
    from diffusers import UNet2DConditionModel

    from stepdistill.kernels.forward_ad import forward_ad_ready
    from stepdistill.teachers.synthetic import SIZES

    cfg = SIZES[size]
    torch.manual_seed(0)
    with torch.device(a.device):
        net = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg).eval()
    b, side = UNET_BATCH[size], cfg["sample_size"]
    x, dx = (torch.randn(b, 4, side, side, device=a.device) for _ in range(2))
    t = torch.full((b,), 500.0, device=a.device)
    c = torch.randn(b, 77, cfg["cross_attention_dim"], device=a.device)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(b, pooled, device=a.device),
                                       "time_ids": torch.randn(b, 6, device=a.device)}}

    def jvp(flash):
        def run():
            with torch.no_grad(), forward_ad_ready(net, flash=flash):
                return torch.func.jvp(lambda x_: net(x_, t, encoder_hidden_states=c, **extra).sample, (x,), (dx,))
        return run

    rows, tangents = [], {}
    for backend, flash in (("kernel", True), ("math", False)):
        row = {"kind": "unet", "name": f"{size} UNet JVP", "shape": f"batch {b}, {side}x{side} latents",
               "dtype": "fp32", "backend": backend}
        rows.append(measure(row, jvp(flash), b * side * side, a, tangents))
    add_error(rows, tangents)
    net = None  # noqa: F841
    return rows


def measure(row, fn, tokens, a, tangents) -> dict:
    try:
        ms, peak, out = timed(fn, a.steps, a.warmup)
        tangents[row["backend"]] = out[1].float()
        row.update(ms=ms, tokens_per_s=tokens / ms * 1e3, peak=peak)
    except torch.cuda.OutOfMemoryError:
        row["note"] = "out of memory"
    except Exception as e:  # one failing configuration must not lose the others' rows
        traceback.print_exc()
        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def add_error(rows, tangents) -> None:
    if "kernel" in tangents and "math" in tangents:
        ref = tangents["math"]
        rows[0]["error"] = ((tangents["kernel"] - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    tangents.clear()


def markdown(rows, card, command, a) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## JVP attention: {card} ({when})", "", f"Machine: {machine()}.", "", "```bash", command, "```", "",
             f"Forward-mode JVP (torch.func.jvp) with the Triton kernel (kernels/jvp_attention.py) against SDPA's math "
             f"backend; {a.steps} timed calls after {a.warmup} warm-up ones. shape: batch x heads x query tokens x "
             "key tokens x head dim. dO error: the kernel's max |dO - dO_math| / max |dO_math|.", "",
             "| kind | configuration | shape | dtype | attention | ms / JVP | tokens/s | peak memory | dO error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['kind']} | {r['name']} | {r['shape']} | {r['dtype']} | {r['backend']} |"
        if "note" in r:
            lines.append(f"{head} {r['note']} ||||")
            continue
        mem = f"{r['peak'] / 2**30:.2f} GiB" if r["peak"] is not None else "n/a (CPU)"
        err = f"{r['error']:.1e}" if "error" in r else ""
        lines.append(f"{head} {r['ms']:.2f} | {r['tokens_per_s']:.3g} | {mem} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--unets", nargs="*", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and a tiny UNet (CPU, under TRITON_INTERPRET=1)")
    p.add_argument("--report", default="docs/benchmarks_gpu.md", help="markdown file the section is appended to")
    a = p.parse_args(argv)
    from stepdistill.kernels.jvp_attention import kernel_status

    a.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (reason := kernel_status(a.device)) is not None:
        p.error(reason)
    configs = [("attention", name, shape, dt) for name, shape in (TINY_ATTENTION if a.tiny else ATTENTION).items()
               for dt in a.dtypes] + [("unet", size, None, None) for size in (["tiny"] if a.tiny else a.unets)]
    card = torch.cuda.get_device_name(a.device) if a.device.type == "cuda" else "CPU (no GPU, Triton interpreter)"
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # a time limit: keep the rows made so far
    rows: list[dict] = []
    done = 0
    try:
        for kind, name, shape, dtype in configs:
            print(f"== {kind} {name} {dtype or ''}", flush=True)
            rows += attention_rows(name, shape, dtype, a) if kind == "attention" else unet_rows(name, a)
            done += 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        command = "python scripts/jvp_attention_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
        text = markdown(rows, card, command, a)
        if done < len(configs):
            text += f"\nStopped (time limit or interrupt) after {done} of {len(configs)} configurations.\n"
        append_report(a.report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
