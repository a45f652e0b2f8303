"""--format single-file: an original-layout Stable Diffusion checkpoint (A1111 / Forge / ComfyUI) that diffusers'
from_single_file loads back into the student's pipeline; and such a file as a teacher (teacher.path + config)."""
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill.errors import InputError, MissingFileError
from stepdistill.eval.harness import generate_student
from stepdistill.export import export_single_file
from stepdistill.export.diffusers_folder import lcm_scheduler
from stepdistill.export.single_file import original_state
from stepdistill.models.lora import merged
from stepdistill.teachers.sd import SDConfig, SDTeacher

N, SEED = 4, 3
PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 2-step LoRA student (rank 4, alpha 8) of a tiny SD 1.x teacher, 2 iterations."""
    from conftest import train_tiny_sd_run

    root = tmp_path_factory.mktemp("single")
    run = train_tiny_sd_run(root, "train.iterations=2", "generator.steps=2", "generator.lora_rank=4",
                            "generator.lora_alpha=8")
    return run, root, generate_student(run.student, run.teacher, N, SEED, N)


def test_every_key_is_in_the_original_layout_and_none_is_lost(lora_run, tmp_path):
    run, _, _ = lora_run
    out = export_single_file(run, tmp_path / "model.safetensors", dtype="fp32")
    state = load_file(out)
    assert all(k.startswith(PREFIXES) for k in state)
    unet, vae = merged(run.student.net.net), run.teacher.codec.vae
    encoder = run.teacher.text.components()["text_encoder"]
    counts = {p: sum(k.startswith(p) for k in state) for p in PREFIXES}
    assert list(counts.values()) == [len(unet.state_dict()), len(vae.state_dict()), len(encoder.state_dict())]
    assert not any(word in k for k in state for word in ("down_blocks", "up_blocks", "mid_block", "resnets"))
    # names of the original layout, and the VAE's mid attention as 1x1 convolutions
    assert state["model.diffusion_model.input_blocks.1.0.in_layers.0.weight"].shape == (16,)
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["stepdistill.steps"] == "2" and "stepdistill.recipe" in meta


def test_from_single_file_reproduces_the_student(lora_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    run, _, expected = lora_run
    out = export_single_file(run, tmp_path / "model.safetensors", dtype="fp32")
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(run.teacher.folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = lcm_scheduler(run)[0]
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(run.teacher.eval_prompt_list(N), num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(SEED)).images
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, run.teacher.decode(expected), rtol=1e-4, atol=1e-5)


def test_an_sd2_student_round_trips_through_from_single_file(tmp_path):
    """SD 2.x (OpenCLIP text encoder, linear transformer projections): the text tower goes under
    `cond_stage_model.model.` in OpenCLIP's names (q, k, v fused), and diffusers' from_single_file rebuilds the
    student's pipeline from the file, text encoder included, to the student's latents."""
    from conftest import train_tiny_sd_run
    from diffusers import StableDiffusionPipeline

    run = train_tiny_sd_run(tmp_path, "train.iterations=1", "generator.lora_rank=4", sd2=True)
    expected = generate_student(run.student, run.teacher, N, SEED, N)
    out = export_single_file(run, tmp_path / "model.safetensors", dtype="fp32")
    state = load_file(out)
    encoder = run.teacher.text.components()["text_encoder"]
    text = [k for k in state if k.startswith("cond_stage_model.")]
    assert all(k.startswith("cond_stage_model.model.") for k in text) and text
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in state
    assert sum(v.numel() for k, v in state.items() if k in text) == sum(v.numel() for v in encoder.parameters())
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(run.teacher.folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(pipe.text_encoder.state_dict()[k], v, rtol=0, atol=0)
    pipe.scheduler = lcm_scheduler(run)[0]
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(run.teacher.eval_prompt_list(N), num_inference_steps=1, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(SEED)).images
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def test_default_dtype_is_fp16_and_other_families_are_refused(lora_run, tmp_path):
    run, _, _ = lora_run
    out = export_single_file(run, tmp_path / "model.safetensors")
    assert {v.dtype for v in load_file(out).values()} == {torch.float16}
    other = types.SimpleNamespace(student=run.student, teacher=types.SimpleNamespace(family="sd3"), recipe=run.recipe)
    with pytest.raises(InputError, match="writes Stable Diffusion 1.x, 2.x and SDXL checkpoints; .* teacher is 'sd3'"):
        export_single_file(other, tmp_path / "x.safetensors")


def test_a_single_file_teacher_equals_its_folder_teacher(tiny_sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    prompts = str(tmp_path / "prompts.txt")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, local_files_only=True)
    with torch.no_grad():  # a fine-tune of the folder's model: the file's weights must be the ones used
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in part.parameters():
                p.mul_(1.1)
    pipe.save_pretrained(tmp_path / "tuned")
    path = tmp_path / "community.safetensors"
    state = original_state(pipe.unet, pipe.vae, {"text_encoder": pipe.text_encoder})
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    folder_teacher = SDTeacher(SDConfig(path=str(tmp_path / "tuned"), prompts=prompts))
    file_teacher = SDTeacher(SDConfig(path=str(path), config=str(tiny_sd_folder), prompts=prompts))
    assert file_teacher.single_file == path and file_teacher.shape == folder_teacher.shape
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, *folder_teacher.shape, generator=gen), torch.tensor([0.3, 0.8])
    cond = folder_teacher.eval_cond(2)
    torch.testing.assert_close(file_teacher.eval_cond(2), cond, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(file_teacher.score(x, t, cond).x0, folder_teacher.score(x, t, cond).x0, rtol=0,
                                   atol=0)
        torch.testing.assert_close(file_teacher.decode(x), folder_teacher.decode(x), rtol=0, atol=0)
    save_file({k: v.half().contiguous() for k, v in state.items()}, path)  # community files are mostly fp16
    half = SDTeacher(SDConfig(path=str(path), config=str(tiny_sd_folder), prompts=prompts))
    assert {p.dtype for m in (half.score, half.codec.vae) for p in m.parameters()} == {torch.float32}


def test_a_single_file_teacher_without_config_names_the_key(tiny_sd_folder, tmp_path):
    path = tmp_path / "community.safetensors"
    save_file({"x": torch.zeros(1)}, path)
    prompts = str(tmp_path / "prompts.txt")
    with pytest.raises(InputError, match=r"is a single checkpoint file: also give teacher.config="):
        SDTeacher(SDConfig(path=str(path), prompts=prompts))
    from stepdistill.recipe import load_recipe

    recipe = load_recipe(None, [f"teacher.config={tiny_sd_folder}"], data={
        "teacher": {"name": "sd", "path": str(path), "prompts": prompts}, "objective": {"name": "vsd"}})
    assert recipe.teacher.config == str(tiny_sd_folder)  # a recipe key, settable as an override
    with pytest.raises(InputError, match=r"teacher.path=.* is not a file: drop teacher.config"):
        SDTeacher(SDConfig(path=str(tiny_sd_folder), config=str(tiny_sd_folder), prompts=prompts))
    with pytest.raises(InputError, match=r"could not load teacher.path=.* as a StableDiffusionPipeline checkpoint"):
        SDTeacher(SDConfig(path=str(path), config=str(tiny_sd_folder), prompts=prompts))
    with pytest.raises(MissingFileError, match=r"teacher.path=.*typo.safetensors.: no such checkpoint file"):
        SDTeacher(SDConfig(path=str(tmp_path / "typo.safetensors"), config=str(tiny_sd_folder), prompts=prompts))


def test_sd15_topology_maps_to_the_blocks_of_an_sd15_checkpoint():
    """A narrow UNet with SD 1.5's topology (4 levels of 2 layers, no attention in the last down / first up level):
    its blocks and up/downsamplers get SD 1.5's original names (diffusers' own loader finds misplaced upsamplers, so
    the round trip alone would not catch them; A1111 and ComfyUI would)."""
    from diffusers import UNet2DConditionModel

    from stepdistill.export.single_file import to_original, unet_prefixes

    unet = UNet2DConditionModel(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8)
    state = to_original(unet.state_dict(), unet_prefixes(unet.config), ())
    blocks = {".".join(k.split(".")[:3]) for k in state if k.startswith(("input_blocks", "output_blocks"))}
    expected = {f"input_blocks.{i}.0" for i in range(12)} | {f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)}
    expected |= {f"output_blocks.{i}.0" for i in range(12)} | {f"output_blocks.{i}.1" for i in range(2, 12)}
    expected |= {"output_blocks.5.2", "output_blocks.8.2"}
    assert blocks == expected
    for key in ("input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "middle_block.1.proj_in.weight",
                "middle_block.2.out_layers.3.weight", "input_blocks.4.0.skip_connection.weight",
                "time_embed.2.weight", "out.2.bias", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"):
        assert key in state
    assert {k.split(".")[0] for k in state} == {"time_embed", "input_blocks", "middle_block", "output_blocks", "out"}


def test_cli_writes_every_format_in_the_asked_dtype(lora_run, tmp_path):
    """--dtype for all four formats; a bf16 pipeline folder loaded back in fp32 samples close to the student (bf16
    keeps 8 bits of mantissa)."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.cli import main

    run, root, expected = lora_run
    out = tmp_path / "m.safetensors"
    assert main(["export", "--run", str(root / "run"), "--format", "single-file", "--out", str(out),
                 "--dtype", "bf16"]) == 0
    assert {v.dtype for v in load_file(out).values()} == {torch.bfloat16}
    fused = tmp_path / "fused.safetensors"
    assert main(["export", "--run", str(root / "run"), "--format", "safetensors", "--out", str(fused),
                 "--dtype", "fp16"]) == 0
    assert {v.dtype for v in load_file(fused).values()} == {torch.float16}
    assert main(["export", "--run", str(root / "run"), "--format", "lora", "--out", str(tmp_path / "l"),
                 "--dtype", "fp16"]) == 0
    assert {v.dtype for f in (tmp_path / "l").glob("*.safetensors") for k, v in load_file(f).items()
            if not k.endswith(".alpha")} == {torch.float16}
    assert main(["export", "--run", str(root / "run"), "--format", "diffusers", "--out", str(tmp_path / "p"),
                 "--dtype", "bf16"]) == 0
    files = list((tmp_path / "p").rglob("*.safetensors"))
    assert len(files) == 3 and {v.dtype for f in files for v in load_file(f).values()} == {torch.bfloat16}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    got = pipe(run.teacher.eval_prompt_list(N), num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(SEED)).images
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_sdxl_student_round_trips_through_from_single_file(tmp_path):
    """SDXL: CLIP-L under conditioner.embedders.0.transformer, OpenCLIP bigG (fused in_proj) under
    conditioner.embedders.1.model. The second encoder is wider than the first, as in SDXL (diffusers tells the two
    apart by width only)."""
    from conftest import make_tiny_sdxl_folder
    from diffusers import StableDiffusionXLPipeline

    from stepdistill.recipe import load_recipe
    from stepdistill.run import load_run
    from stepdistill.training.trainer import Trainer

    folder = make_tiny_sdxl_folder(tmp_path / "sdxl", width_2=48)
    (tmp_path / "prompts.txt").write_text("a red shirt\na blue bag\n")
    data = {"teacher": {"name": "sd", "path": str(folder), "prompts": str(tmp_path / "prompts.txt")},
            "objective": {"name": "vsd", "update_ratio": 1}}
    Trainer(load_recipe(None, ["train.batch_size=2", "train.iterations=2", "train.lr=1e-2", "eval.at_end=false",
                               "generator.steps=2", "generator.lora_rank=2"], data=data), tmp_path / "run",
            quiet=True).run()
    run = load_run(tmp_path / "run")
    expected = generate_student(run.student, run.teacher, 2, SEED, 2)
    out = export_single_file(run, tmp_path / "xl.safetensors", dtype="fp32")
    state = load_file(out)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert all(k.startswith(prefixes) for k in state)
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert state["conditioner.embedders.1.model.text_projection"].shape == (48, 16)
    parts = [merged(run.student.net.net), run.teacher.codec.vae, *run.teacher.text.components().values()]
    n_open_clip = 4 * 2  # per layer: q, k, v weights and biases become one in_proj weight and bias
    assert len(state) == sum(len(p.state_dict()) for p in parts if hasattr(p, "state_dict")) - n_open_clip
    pipe = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    pipe.scheduler = lcm_scheduler(run)[0]
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(run.teacher.eval_prompt_list(2), num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(SEED)).images
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
