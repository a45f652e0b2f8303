"""stepdistill plan (stepdistill/plan.py): parameter counts, the planned peak against a measured CPU iteration, the
SDXL-size plan, and the command line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stepdistill.models.score import held_modules
from stepdistill.plan import GiB, LiveBytes, build_meta, parse_bytes, plan
from stepdistill.recipe import load_recipe


def tiny(**train):
    return load_recipe(None, data={"teacher": {"name": "synthetic-unet", "size": "tiny"},
                                   "objective": {"name": "vsd", "update_ratio": 1},
                                   "train": {"batch_size": 4, "ema": 0.99, **train}, "eval": {"at_end": False}})


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("141GB") == 141 * 10 ** 9


def test_param_counts_match_real_networks():
    from stepdistill.training.trainer import build

    for lora in (0, 4):
        recipe = load_recipe(data={"teacher": {"name": "synthetic-unet", "size": "tiny"},
                                   "objective": {"name": "vsd"}, "generator": {"lora_rank": lora}})
        real = build(recipe).nets
        p = plan(recipe, activations=False)
        assert p.params["teacher"] == sum(x.numel() for x in real.teacher.parameters())
        trained = sum(x.numel() for n in (real.generator, real.fake_score) for x in n.parameters() if x.requires_grad)
        assert p.trainable == trained
        if lora:  # adapters only; the base is the teacher's, counted once
            assert p.params["generator"] < p.params["teacher"] / 2


def test_fsdp_divides_sharded_state():
    one = plan(tiny(), 1, activations=False)
    four = plan(tiny(fsdp=True), 4, activations=False)
    assert abs(four.components["generator weights"] * 4 - one.components["generator weights"]) <= 4


def measured_peak(recipe, tmp_path) -> int:
    """An iteration of the real trainer on the CPU: the bytes of every tensor alive before it (weights, AdamW moments,
    EMA) plus the peak of those it allocates (LiveBytes on real tensors)."""
    from stepdistill.training.trainer import Trainer

    trainer = Trainer(recipe, tmp_path, quiet=True)
    trainer.train_step()  # the first step creates the AdamW moments
    trainer.step = 1
    held = {}
    pipeline = held_modules(trainer.built.teacher)  # what Teacher.to moves
    for m in (trainer.nets.teacher, trainer.nets.generator, trainer.nets.fake_score, trainer.ema.model, *pipeline):
        for x in [*m.parameters(), *m.buffers()] if m is not None else []:
            held[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    for o in trainer.optimizers.values():
        for state in o.state.values():
            for x in state.values():
                if torch.is_tensor(x) and x.numel() > 1:
                    held[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    with LiveBytes() as tracker:
        trainer.train_step()
    return sum(held.values()) + tracker.peak


def test_planned_peak_matches_measured_cpu_iteration(tmp_path):
    recipe = tiny()
    planned, measured = plan(recipe).peak, measured_peak(recipe, tmp_path)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


@pytest.mark.parametrize("recipe", ["configs/fashion/vsd_1step.yaml", "configs/fashion_t2i/vsd_1step.yaml"])
def test_a_bundled_teacher_is_planned_with_everything_training_holds(recipe, tmp_path):
    """Every module the teacher moves to the device counts: the text-to-image pipeline's VAE and text encoder (0.8 GB
    for SD1.5 in fp32, 19 GB of T5 for FLUX), and no second copy of a pixel teacher (a diffusers teacher once kept
    one for its students to copy, which training moved to the GPU with it)."""
    overrides = ["train.batch_size=4", "train.ema=0.99", "eval.at_end=false", "objective.regression_weight=0",
                 "generator.warm_start_iterations=0"]
    r = load_recipe(recipe, overrides)
    p = plan(r, flops=False)
    built, _ = build_meta(r)
    modules = {k: v for k, v in vars(built.teacher).items() if isinstance(v, torch.nn.Module)}
    rest = sum(x.numel() * x.element_size() for k in ("text", "codec") if k in modules
               for x in [*modules[k].parameters(), *modules[k].buffers()])
    assert p.components.get("teacher VAE and text encoders", 0) == rest and (rest > 0) == ("t2i" in recipe)
    measured = measured_peak(r, tmp_path)
    assert abs(p.peak / measured - 1) < 0.15, (p.peak, measured)


FAMILIES = {"sd3_medium_dmd2": ("tiny-sd3", 2.0e9), "flux_dev_dmd2": ("tiny-flux", 11.9e9),
            "sana_1600m_sprint": ("tiny-sana", 1.6e9)}  # plan config: test size, published parameter count


@pytest.mark.parametrize("name", FAMILIES)
def test_transformer_plan_configs_plan_at_tiny_size_as_measured(name, tmp_path):
    """Each transformer plan config as configured (vsd with LoRA, or sCM with its JVP and guidance embedding; bf16
    emulation, gradient checkpointing) at the family's test size: every phase runs on meta tensors, and the planned
    peak is within 15% of a measured CPU iteration (fp32 there: CPU bf16 autocast is not what the plan emulates)."""
    over = [f"teacher.size={FAMILIES[name][0]}", "train.batch_size=4", "train.grad_accum=1", "train.ema=0.99",
            "generator.lora_rank=4" if "flux" in name else "generator.lora_rank=0"]
    if "dmd2" in name:  # the measured iteration runs every phase, as the plan's iteration 0 does
        over.append("objective.update_ratio=1")
    p = plan(load_recipe(f"configs/plan/{name}.yaml", over))
    assert not p.notes and p.flops > 0 and p.peak > p.static
    recipe = load_recipe(f"configs/plan/{name}.yaml", [*over, "train.precision=fp32", "train.teacher_dtype=fp32",
                                                       "train.log_with=[]"])
    planned, measured = plan(recipe).peak, measured_peak(recipe, tmp_path)
    assert abs(planned / measured - 1) < 0.15, (planned, measured)


@pytest.mark.parametrize("name", FAMILIES)
def test_transformer_plan_configs_are_the_published_sizes(name):
    """SD3-medium's transformer 2.0B (2.028B), FLUX.1-dev's 11.9B (11.901B), SANA-1.6B's 1.6B (1.604B): the real-size
    synthetic teachers, built on meta by the plan."""
    p = plan(load_recipe(f"configs/plan/{name}.yaml"), 8, activations=False)
    assert p.params["teacher"] == pytest.approx(FAMILIES[name][1], rel=0.03)
    assert all(x.is_meta for x in build_meta(load_recipe(f"configs/plan/{name}.yaml"))[0].nets.teacher.parameters())


def test_sdxl_plan_counts_sdxl_unet():
    recipe = load_recipe("configs/plan/sdxl_dmd2.yaml")
    p = plan(recipe, 64, 80 * GiB, activations=False)
    assert 2.56e9 < p.params["teacher"] < 2.58e9  # SDXL's UNet: 2.567B
    assert not p.fits or p.peak > 0


def test_cli_prints_verdict_and_suggestions(capsys):
    from stepdistill.cli import main

    assert main(["plan", "configs/plan/sd15_dmd2.yaml", "train.batch_size=2", "train.ema=0.5", "generator.steps=1",
                 "teacher.size=tiny", "--gpu-memory", "80GiB"]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["plan", "configs/plan/sd15_dmd2.yaml", "train.batch_size=4", "teacher.size=tiny",
                 "--gpu-memory", "8MiB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and " - " in out


def test_build_meta_allocates_no_weights():
    built, _ = build_meta(load_recipe("configs/plan/sdxl_dmd2.yaml"))
    assert all(x.is_meta for x in built.nets.generator.parameters())


def test_plan_answers_for_the_bundled_text_to_image_recipe():
    """A real pipeline's text encoder built without weights (transformers' hub kernels refuse the meta device), and
    vsd's regression pairs (which the warm start would make) held through the run and counted."""
    import math

    recipe = load_recipe("configs/fashion_t2i/vsd_1step.yaml")
    p = plan(recipe, flops=False)
    assert p.notes == [] and {"generator", "fake_score"} <= set(p.transient)  # every phase ran on meta tensors
    built, _ = build_meta(recipe)
    latent = math.prod(built.teacher.shape) * 4  # float32 bytes of one z (and of one x0)
    pairs = recipe.generator.warm_start_pairs
    assert p.components["teacher ODE pairs (regression)"] > pairs * 2 * latent  # z, x0 and the prompts' encodings


SHIPPED = sorted(str(p) for p in Path("configs").rglob("*.yaml") if p.parent.name not in ("bench", "plan"))


@pytest.mark.parametrize("path", SHIPPED)
def test_every_shipped_recipe_plans_with_every_phase_run(path):
    """`stepdistill plan` answers for every recipe the project ships (the plan recipes have their own tests): every
    phase ran on meta tensors (no note), in seconds on 2 CPU cores (0.1 to 10 s each, memory only)."""
    p = plan(load_recipe(path), flops=False)
    assert p.notes == [] and p.transient and p.peak > sum(p.components.values())
