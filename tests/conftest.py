import atexit
import json
import os
import shutil
import tempfile

import pytest
import torch
from torch.overrides import TorchFunctionMode

if not torch.cuda.is_available():  # Triton's interpreter runs the Triton kernels on the CPU (tests/kernels/
    os.environ.setdefault("TRITON_INTERPRET", "1")  # test_jvp_attention.py); set before triton's first import

from stepdistill.models.tokenizer import byte_level_clip_tokenizer, text_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
# tests neither read nor fill the user's cache (teacher ODE pairs, reference statistics, Inception weights)
os.environ.setdefault("STEPDISTILL_CACHE", tempfile.mkdtemp(prefix="stepdistill-test-cache-"))
atexit.register(shutil.rmtree, os.environ["STEPDISTILL_CACHE"], ignore_errors=True)
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes are referenced as configs/...


SLOW_LIST = os.path.join("tests", "slow_tests.txt")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over about 5 s on 2 CPU cores (tests/slow_tests.txt); `make test-fast` "
                                       "runs the others")
    config.addinivalue_line("markers", "bench: too long for CI (convergence runs, the whole dry-run matrix); "
                                       "`make test-bench` runs them, `make test` the others")


def pytest_collection_modifyitems(config, items):
    """Mark the tests tests/slow_tests.txt names (node ids from `make test`'s --durations list, or whole files) slow,
    so the list lives in one file rather than as decorators spread over the suite."""
    if not os.path.exists(SLOW_LIST):
        return
    with open(SLOW_LIST) as f:
        slow = {line.split("#")[0].strip() for line in f} - {""}
    for item in items:
        if item.nodeid in slow or item.nodeid.split("::")[0] in slow or item.nodeid.split("[")[0] in slow:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def make_tiny_unet_folder(path, num_classes: int = 3, prediction_type: str = "v_prediction"):
    """A tiny class-conditional diffusers folder (unet/ + scheduler/ + stepdistill.json), built from config."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1)
    unet.save_pretrained(path / "unet")
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    scheduler.save_pretrained(path / "scheduler")
    (path / "stepdistill.json").write_text(json.dumps({"conditioning": "class", "null_label": num_classes}))
    return path


@pytest.fixture
def tiny_unet_folder(tmp_path):
    return make_tiny_unet_folder(tmp_path / "teacher")


@pytest.fixture
def gmm_built():
    """build() for a gmm recipe with a narrow student MLP and the objective's defaults: gmm_built("objective.name=sid",
    ...), or gmm_built(..., recipe="configs/toy/...")."""
    from stepdistill.recipe import load_recipe
    from stepdistill.training.trainer import build

    def make(*overrides: str, recipe: str | None = None):
        data = None if recipe else {"teacher": {"name": "gmm"}, "objective": {"name": "vsd"}}
        return build(load_recipe(recipe, ["teacher.hidden=64", *overrides], data=data))

    return make


TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def make_tiny_sd_folder(path, prediction_type: str = "epsilon", sd2: bool = False):
    """A tiny Stable Diffusion pipeline folder built offline (the layout of a real SD1.5 download): a 2-block
    UNet2DConditionModel on 4x8x8 latents, a 2-block AutoencoderKL (16x16 RGB images), a 2-layer CLIP text encoder
    with the local tokenizer, and a DDPM scheduler. `sd2`: SD 2.x's differences, an OpenCLIP-style text encoder (gelu)
    and linear projections in the UNet's transformers."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab = byte_level_clip_tokenizer(path.with_name(path.name + "_tokenizer_src"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8, use_linear_projection=sd2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(vocab), hidden_act="gelu" if sd2 else "quick_gelu"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(path)
    return path


def make_tiny_sdxl_folder(path, width_2: int = 32):
    """A tiny SDXL pipeline folder built offline: two CLIP text encoders (the second with a projection: the pooled
    embedding; `width_2` its width, 1280 against 768 in SDXL), a UNet with SDXL's text_time added conditioning, a
    2-block VAE and SDXL's Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = byte_level_clip_tokenizer(path.with_name(path.name + "_tokenizer_src"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32 + width_2,
                                attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
                                transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.13025)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(vocab)))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(vocab, hidden=width_2),
                                                                projection_dim=16))
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                              add_watermarker=False).save_pretrained(path)
    return path


def make_tiny_sd3_folder(path, t5: bool = True):
    """A tiny SD3 pipeline folder built offline: two CLIP encoders with projections, a 1-layer T5 encoder (with the
    local byte-level tokenizer; t5=False leaves it out, as SD3 allows), a 2-layer SD3Transformer2DModel whose joint
    width (96) is wider than the CLIPs' together (64), a 2-block VAE with a shift factor, and SD3's flow scheduler."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, vocab = byte_level_clip_tokenizer(path.with_name(path.name + "_tokenizer_src"))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=96,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609)
    clip = [CLIPTextModelWithProjection(CLIPTextConfig(**text_config(vocab), projection_dim=16)) for _ in range(2)]
    t5_encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=96, d_kv=8, d_ff=64, num_layers=1,
                                         num_heads=2)) if t5 else None
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=clip[0], tokenizer=tokenizer, text_encoder_2=clip[1], tokenizer_2=tokenizer,
                             text_encoder_3=t5_encoder, tokenizer_3=tokenizer if t5 else None).save_pretrained(path)
    return path


def make_tiny_flux_folder(path):
    """A tiny FLUX-dev pipeline folder built offline: a CLIP text encoder (pooled output) and a 1-layer T5 (with the
    local byte-level tokenizer), a FluxTransformer2DModel with a guidance embedding, a 2-block VAE with a shift
    factor and FLUX's dynamically shifted flow scheduler. Sample it at 16 px (teacher.resolution=16)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, vocab = byte_level_clip_tokenizer(path.with_name(path.name + "_tokenizer_src"))
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159)
    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_config(vocab))),
                 tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
                 transformer=transformer).save_pretrained(path)
    return path


def make_tiny_sana_folder(path):
    """A tiny SANA pipeline folder built offline: a 1-layer Gemma2 text encoder (with the local byte-level tokenizer),
    a 1-layer SanaTransformer2DModel on 16x16 latents (SanaPipeline wants images of a multiple of 32 px), a 2-block
    AutoencoderDC and SANA's DPM-Solver on flow sigmas."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer, vocab = byte_level_clip_tokenizer(path.with_name(path.name + "_tokenizer_src"))
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types=("ResBlock",) * 2,
                        decoder_block_types=("ResBlock",) * 2, encoder_block_out_channels=(8, 16),
                        decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                        decoder_qkv_multiscales=((), ()), scaling_factor=0.41407)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16))
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                 scheduler=scheduler).save_pretrained(path)
    return path


def train_tiny_sd_run(root, *overrides: str, sd2: bool = False):
    """A VSD LoRA-ready student of a tiny SD teacher (folder and 3 prompts under `root`; `sd2`: SD 2.x's text encoder
    and UNet), trained with `overrides` (batch 4, lr 1e-2, no evaluation); returns the loaded run."""
    from stepdistill.recipe import load_recipe
    from stepdistill.run import load_run
    from stepdistill.training.trainer import Trainer

    folder = make_tiny_sd_folder(root / "sd", sd2=sd2)
    (root / "prompts.txt").write_text("a red shirt\na blue bag\na green shoe\n")
    data = {"teacher": {"name": "sd", "path": str(folder), "prompts": str(root / "prompts.txt")},
            "objective": {"name": "vsd", "update_ratio": 1}}
    recipe = load_recipe(None, ["train.batch_size=4", "train.lr=1e-2", "eval.at_end=false", *overrides], data=data)
    Trainer(recipe, root / "run", quiet=True).run()
    return load_run(root / "run")


@pytest.fixture
def tiny_sd_folder(tmp_path):
    folder = make_tiny_sd_folder(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red shirt\na blue bag\na green shoe\na black dress\n")
    return folder


def make_tiny_clip_folder(path, image_size: int = 32):
    """A tiny CLIPModel + CLIPProcessor folder built offline: a character-level BPE tokenizer (every byte, no merges)
    written locally, 2-layer text and vision towers."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab = byte_level_clip_tokenizer(path)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text_config(vocab), vision_config=dict(image_size=image_size, patch_size=8,
                                                                                **TOWER), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    size = {"height": image_size, "width": image_size}
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size),
                  tokenizer=tokenizer).save_pretrained(path)
    return path


def crash_at(monkeypatch, step: int):
    """Make Trainer.train_step (as it is now) raise RuntimeError("simulated crash") at iteration `step`; returns the
    step it replaced, to put back."""
    from stepdistill.training.trainer import Trainer

    original = Trainer.train_step

    def crash(self):
        if self.step == step:
            raise RuntimeError("simulated crash")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", crash)
    return original


def same_newest_checkpoint(a, b):
    """Assert that two run folders' newest checkpoints hold bitwise equal weights; returns both (step, weights, state)
    for further checks."""
    from stepdistill.training.state import load_latest

    (sa, wa, ra), (sb, wb, rb) = load_latest(a / "checkpoints"), load_latest(b / "checkpoints")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    return (sa, wa, ra), (sb, wb, rb)


class HostReads(TorchFunctionMode):
    """Records every read of a tensor's values into Python: on a GPU each is a host sync (the host waits for the
    queue); on the CPU the same calls, so they are counted here."""
    READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__",
             "__array__"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))
