"""Train the bundled text-to-image Fashion-MNIST teacher: a complete Stable Diffusion pipeline folder in miniature.

`python scripts/train_fashion_t2i.py --out checkpoints/fashion-t2i --vae-minutes 6 --unet-minutes 45`

Same components and conventions as SD1.5, so a distillation of it runs the code path of a real SD folder: an
AutoencoderKL (1-channel 16x16 images <-> 4x8x8 latents, scaling_factor = 1 / std of the training latents), a CLIP
text encoder with a byte-level tokenizer (77 tokens), a UNet2DConditionModel with cross-attention, SD1.5's
scaled-linear DDPM schedule with epsilon prediction, and 10% empty-prompt dropout for classifier-free guidance.
The text encoder is randomly initialised and frozen (a stand-in for CLIP: it tells prompts apart, it knows no
language); prompts name the class in one of several templates.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import fashion
from .fashion_train import update

TEMPLATES = ("a photo of a {}", "a {}", "a picture of a {}", "a black and white photo of a {}", "an image of a {}")
EVAL_TEMPLATE = TEMPLATES[0]


def class_name(label: int) -> str:
    return fashion.CLASS_NAMES[label].lower()


def training_prompts() -> list[tuple[str, int]]:
    """(prompt, label) for every template and class."""
    return [(t.format(class_name(c)), c) for t in TEMPLATES for c in range(10)]


def eval_prompts() -> list[str]:
    """One prompt per class, in label order: cycled, they give the balanced labels i % 10 of the test set."""
    return [EVAL_TEMPLATE.format(class_name(c)) for c in range(10)]


def build_parts(tokenizer_dir: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.tokenizer import byte_level_clip_tokenizer, text_config

    tokenizer, vocab = byte_level_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(vocab, hidden=64, layers=2, heads=4)))
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=fashion.RESOLUTION)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), norm_num_groups=32, cross_attention_dim=64,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", clip_sample=False, steps_offset=1)
    return tokenizer, text_encoder, vae, unet, scheduler


def train_vae(vae, x: torch.Tensor, minutes: float, batch_size: int = 128, lr: float = 1e-3,
              kl_weight: float = 1e-6) -> dict:
    """Reconstruction MSE + a small KL (SD's VAE recipe without the perceptual and GAN terms)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    start, step, rec = time.time(), 0, torch.tensor(float("nan"))
    bar = tqdm(total=int(minutes * 60), unit="s", desc="vae", mininterval=10)
    while time.time() - start < minutes * 60:
        batch = x[torch.randint(0, len(x), (batch_size,))]
        post = vae.encode(batch).latent_dist
        recon = vae.decode(post.sample()).sample
        rec = F.mse_loss(recon, batch)
        loss = rec + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.n = int(time.time() - start)
        bar.set_postfix(step=step, mse=f"{rec.item():.4f}")
    bar.close()
    return {"vae_steps": step, "vae_minutes": round((time.time() - start) / 60, 1),
            "vae_last_mse": round(rec.item(), 5)}


@torch.no_grad()
def encode_all(vae, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + batch_size]).latent_dist.mean for i in range(0, len(x), batch_size)])


def train_unet(unet, latents, labels, embeddings, null, scheduler, minutes, batch_size=128, lr=5e-4,
               ema_decay=0.999, dropout=0.1):
    """Epsilon prediction on the scaled latents; prompt i of class c is embeddings[template, c]."""
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    alphas = scheduler.alphas_cumprod
    start, step = time.time(), 0
    bar = tqdm(total=int(minutes * 60), unit="s", desc="unet", mininterval=10)
    while time.time() - start < minutes * 60:
        idx = torch.randint(0, len(latents), (batch_size,))
        z0, y = latents[idx], labels[idx]
        cond = embeddings[torch.randint(0, embeddings.shape[0], (batch_size,)), y]
        drop = torch.rand(batch_size) < dropout
        cond[drop] = null
        t = torch.randint(0, 1000, (batch_size,))
        eps = torch.randn_like(z0)
        a, s = alphas[t].sqrt().view(-1, 1, 1, 1), (1 - alphas[t]).sqrt().view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a * z0 + s * eps, t, encoder_hidden_states=cond).sample, eps)
        update(unet, ema, opt, loss, step, lr, ema_decay)
        step += 1
        bar.n = int(time.time() - start)
        bar.set_postfix(step=step, loss=f"{loss.item():.4f}")
    bar.close()
    return ema, {"unet_steps": step, "unet_minutes": round((time.time() - start) / 60, 1), "batch_size": batch_size,
                 "lr": lr, "ema_decay": ema_decay, "prompt_dropout": dropout}


def train_fashion_t2i(out: str, vae_minutes: float, unet_minutes: float, seed: int = 0) -> dict:
    from diffusers import StableDiffusionPipeline

    from ..models.conditioning import TextEncoder

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer, text_encoder, vae, unet, scheduler = build_parts(tmp / "_tokenizer")
    torch.manual_seed(seed)
    x, y = fashion.load("train")
    info = {"seed": seed, **train_vae(vae, x, vae_minutes)}
    vae.eval().requires_grad_(False)
    means = encode_all(vae, x)
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    latents = means * vae.config.scaling_factor
    text = TextEncoder([tokenizer], [text_encoder])
    prompts = training_prompts()
    embeddings = text([p for p, _ in prompts]).view(len(TEMPLATES), 10, text.max_length, -1)
    ema, unet_info = train_unet(unet, latents, y, embeddings, text([""])[0], scheduler, unet_minutes)
    info.update(unet_info)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=ema.to(torch.float16),  # fp16 on disk keeps the folder small; loaders upcast
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "_tokenizer")
    (tmp / "prompts.txt").write_text("".join(p + "\n" for p, _ in prompts))
    (tmp / "eval_prompts.txt").write_text("".join(p + "\n" for p in eval_prompts()))
    meta = {"conditioning": "text", "class_names": list(fashion.CLASS_NAMES), "resolution": fashion.RESOLUTION,
            "channels": 1, "latent_shape": [4, 8, 8], "templates": list(TEMPLATES),
            "eval_prompts": "eval_prompts.txt: one per class in label order", **info}
    (tmp / "stepdistill.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return info
