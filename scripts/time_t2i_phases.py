"""Time the three phases of a text-to-image recipe's training on this machine, per unit: one guided teacher
evaluation of a pair batch (the warm start's teacher ODE pairs: warm_start_pairs / 256 batches x warm_start_nfe of
them), one regression warm-start iteration, and the same with bf16 autocast or channels-last memory.
docs/t2i_routes.md and the README's text-to-image section quote its output; a VSD iteration is timed by
a short `stepdistill train` (its stats.jsonl).

    python scripts/time_t2i_phases.py [RECIPE] [--repeats N] [--compile]

Run it alone: timings beside another torch process are wrong."""
from __future__ import annotations

import argparse
import time

import torch

from stepdistill.recipe import load_recipe
from stepdistill.training.build import build


def seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="configs/fashion_t2i/vsd_1step.yaml")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the warm-start iteration under torch.compile")
    a = p.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe(a.recipe)
    built = build(recipe)
    teacher, generator = built.teacher, built.nets.generator
    scale, batch = recipe.objective.guidance_scale, recipe.train.batch_size
    print(f"{torch.get_num_threads()} threads, {sum(p.numel() for p in generator.parameters()) / 1e6:.2f}M "
          f"parameters, samples of shape {tuple(teacher.shape)}")

    z, cond, t = torch.randn(256, *teacher.shape), teacher.sample_cond(256), torch.full((256,), 0.5)

    def guided():
        with torch.no_grad():
            teacher.score.guided(z, t, cond, scale)
    print(f"guided teacher evaluation, batch 256, fp32 weights: {seconds(guided, a.repeats):.3f} s")
    teacher.score.to(torch.bfloat16)
    print(f"guided teacher evaluation, batch 256, bf16 weights: {seconds(guided, a.repeats):.3f} s")
    teacher.score.to(torch.float32)

    zs, cs, target = torch.randn(batch, *teacher.shape), teacher.sample_cond(batch), torch.randn(batch, *teacher.shape)
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-6)

    def warm_step(step=generator.step, autocast=False, channels_last=False):
        x = generator.prior(zs)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = step(x, 0, cs)
        loss = (out.float() - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    repeats = 2 * a.repeats
    print(f"warm-start iteration, batch {batch}, fp32: {seconds(warm_step, repeats):.3f} s")
    print(f"warm-start iteration, batch {batch}, bf16 autocast: "
          f"{seconds(lambda: warm_step(autocast=True), repeats):.3f} s")
    generator.to(memory_format=torch.channels_last)
    print(f"warm-start iteration, batch {batch}, channels-last: "
          f"{seconds(lambda: warm_step(channels_last=True), repeats):.3f} s")
    generator.to(memory_format=torch.contiguous_format)
    if a.compile:
        compiled = torch.compile(generator.step)
        start = time.perf_counter()
        warm_step(compiled)
        print(f"torch.compile: first iteration {time.perf_counter() - start:.0f} s")
        print(f"warm-start iteration, batch {batch}, compiled: {seconds(lambda: warm_step(compiled), repeats):.3f} s")


if __name__ == "__main__":
    main()
