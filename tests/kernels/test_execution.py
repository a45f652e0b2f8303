"""Attention backends, gradient checkpointing, teacher dtype and torch.compile: same outputs, clear messages."""
import sys
import warnings

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from stepdistill.kernels import set_attention, xformers_status
from stepdistill.kernels.execution import enable_gradient_checkpointing
from stepdistill.models.mlp import MLPDenoiser
from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.training.trainer import Trainer


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0, 990.0]), torch.randn(3, 7, 32, generator=g)


def processors(unet) -> set[type]:
    return {type(p) for p in unet.attn_processors.values()}


def test_sdpa_and_math_attention_agree_in_fp32_and_within_bf16_tolerance_under_autocast():
    unet = tiny_unet()
    x, t, c = inputs()
    out = {}
    for backend, cls in (("math", AttnProcessor), ("sdpa", AttnProcessor2_0)):
        assert set_attention(unet, backend) == backend and processors(unet) == {cls}
        with torch.no_grad():
            out[backend] = unet(x, t, encoder_hidden_states=c).sample
            with torch.autocast("cpu", torch.bfloat16):
                out[backend + "_bf16"] = unet(x, t, encoder_hidden_states=c).sample.float()
    assert torch.allclose(out["sdpa"], out["math"], atol=1e-5, rtol=1e-5)
    scale = out["math"].abs().max()
    for backend in ("sdpa", "math"):  # bf16 keeps 8 bits of mantissa: a few 1e-2 relative after a dozen layers
        assert (out[backend + "_bf16"] - out["math"]).abs().max() < 5e-2 * scale


def test_xformers_when_absent_warns_naming_the_fallback_and_uses_sdpa(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # `import xformers` raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    unet = tiny_unet()
    set_attention(unet, "math")
    assert "not installed" in xformers_status()
    with pytest.warns(UserWarning, match="falling back to sdpa"):
        assert set_attention(unet, "xformers", "teacher") == "sdpa"
    assert processors(unet) == {AttnProcessor2_0}


@pytest.mark.skipif(xformers_status() is not None, reason=f"xformers unusable here: {xformers_status()}")
def test_xformers_agrees_with_sdpa():
    unet = tiny_unet().cuda()
    x, t, c = (v.cuda() for v in inputs())
    with torch.no_grad():
        set_attention(unet, "sdpa")
        ref = unet(x, t, encoder_hidden_states=c).sample
        assert set_attention(unet, "xformers") == "xformers"
        assert torch.allclose(unet(x, t, encoder_hidden_states=c).sample, ref, atol=1e-4)


def test_networks_without_attention_ignore_the_setting():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even the xformers fallback warning: there is no attention to run
        assert set_attention(MLPDenoiser(2, 16), "xformers") == "n/a"
    with pytest.raises(ValueError, match="choose one of sdpa, xformers, math"):
        set_attention(tiny_unet(), "flash")


def test_gradient_checkpointing_gives_the_same_gradients_and_refuses_mlps_by_name():
    x, t, c = inputs()
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            enable_gradient_checkpointing(unet, "generator")
        unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(RecipeError, match=r"fake_score network \(MLPDenoiser\) does not support"):
        enable_gradient_checkpointing(MLPDenoiser(2, 16), "fake_score")


def gmm_recipe(*overrides):
    return load_recipe(None, ["teacher.hidden=32", "train.batch_size=64", "eval.at_end=false", *overrides],
                       data={"teacher": {"name": "gmm"}, "objective": {"name": "sid"}})


def test_trainer_applies_the_recipe_and_reports_it(tmp_path):
    trainer = Trainer(gmm_recipe("train.attention=xformers", "train.teacher_dtype=bf16"), tmp_path, quiet=True)
    assert trainer.execution["teacher"] == {"attention": "n/a", "dtype": "n/a"}  # analytic: no attention, no weights
    logs = trainer.train_step()
    assert all(torch.isfinite(torch.as_tensor(v)) for v in logs.values())
    with pytest.raises(RecipeError, match="gradient checkpointing"):
        Trainer(gmm_recipe("train.gradient_checkpointing=true"), tmp_path / "b", quiet=True)


def test_teacher_in_bf16_with_lora_students_needs_bf16_autocast(tiny_sd_folder, tmp_path):
    prompts = str(tiny_sd_folder.parent / "prompts.txt")
    data = {"teacher": {"name": "sd", "path": str(tiny_sd_folder), "prompts": prompts}, "objective": {"name": "sid"}}
    base = ["train.batch_size=2", "generator.lora_rank=2", "train.teacher_dtype=bf16", "eval.at_end=false"]
    with pytest.raises(RecipeError, match="set train.precision=bf16"):
        Trainer(load_recipe(None, base, data=data), tmp_path / "a", quiet=True)
    trainer = Trainer(load_recipe(None, [*base, "train.precision=bf16", "train.gradient_checkpointing=true",
                                         "train.attention=math"], data=data), tmp_path / "b", quiet=True)
    assert trainer.execution["generator"] == {"attention": "math", "gradient_checkpointing": "on"}
    assert trainer.execution["teacher"]["dtype"] == "bf16"
    assert next(trainer.nets.teacher.parameters()).dtype == torch.bfloat16
    assert {p.dtype for p in trainer.nets.generator.parameters() if p.requires_grad} == {torch.float32}  # adapters
    logs = trainer.train_step()
    assert torch.isfinite(logs["loss/generator"]) and logs["grad_norm/generator"] > 0


def test_compiled_networks_train_like_eager_ones(tmp_path):
    """torch.compile at MLP size (a few seconds on a CPU; a UNet takes minutes to compile there, so is not tested)."""
    losses = []
    for compiled in (False, True):
        recipe = gmm_recipe(f"train.compile={str(compiled).lower()}", "train.ema=0.9")
        trainer = Trainer(recipe, tmp_path / str(compiled), quiet=True)
        torch.manual_seed(0)
        losses.append([float(trainer.train_step()["loss/generator"]) for _ in range(2)])
        assert set(trainer.nets.generator.state_dict()) == set(trainer.ema.model.state_dict())  # keys unchanged
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)


def test_transformers_keep_their_own_attention_processors():
    """SD3 / FLUX / SANA blocks have their own processors (joint attention here): sdpa keeps them, math warns and
    keeps them; replacing them with the UNets' plain processor would break the network."""
    from diffusers import SD3Transformer2DModel

    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)
    before = {type(p) for p in net.attn_processors.values()}
    assert set_attention(net, "sdpa") == "sdpa" and {type(p) for p in net.attn_processors.values()} == before
    with pytest.warns(UserWarning, match="has its own attention processors"):
        assert set_attention(net, "math") == "sdpa"
    assert {type(p) for p in net.attn_processors.values()} == before
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    assert net(x, encoder_hidden_states=text, pooled_projections=torch.randn(1, 8), timestep=torch.tensor([500.0])
               ).sample.shape == x.shape


def test_xformers_leaves_sanas_linear_attention_alone(monkeypatch):
    """diffusers' enable_xformers_memory_efficient_attention would replace SANA's ReLU linear attention by softmax
    attention: with xformers usable (pretended here, as this machine has no CUDA) a SANA transformer keeps its own
    processors, warns, and reports sdpa."""
    from diffusers import SanaTransformer2DModel

    from stepdistill.kernels import attention

    net = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                 num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                 cross_attention_dim=16, caption_channels=8, sample_size=8, patch_size=1)
    before = {name: type(p) for name, p in net.attn_processors.items()}
    assert any("Linear" in t.__name__ for t in before.values())
    monkeypatch.setattr(attention, "xformers_status", lambda device=None: None)
    with pytest.warns(UserWarning, match="train.attention=xformers for the network: SanaTransformer2DModel has its"):
        assert set_attention(net, "xformers") == "sdpa"
    assert {name: type(p) for name, p in net.attn_processors.items()} == before


def test_a_bf16_teacher_run_is_scored_against_its_fp32_teacher(tmp_path):
    """train.teacher_dtype=bf16 trains against the teacher in bf16, but the evaluation at the end scores the teacher
    rebuilt in fp32, so the run's teacher score (and ratio) is the one an fp32 run and `stepdistill eval --run` get."""
    from stepdistill.training.students import train

    teacher = {}
    for dtype in ("fp32", "bf16"):
        recipe = load_recipe(None, [f"train.teacher_dtype={dtype}", "train.iterations=1", "train.batch_size=4",
                                    "eval.n=160", "eval.teacher_nfe=3", "eval.split=val", "eval.batch_size=160"],
                             data={"teacher": {"name": "fashion-mnist"}, "objective": {"name": "vsd"}})
        metrics = train(recipe, tmp_path / dtype, quiet=True)
        teacher[dtype] = metrics["teacher"]["fd"]
    assert teacher["bf16"] == teacher["fp32"]
