"""Codecs between the space a teacher denoises and pixels: the identity for pixel teachers, a VAE for latent ones.

Latents are the VAE's `(latent_dist.mean - shift_factor) * scaling_factor`, the convention of every diffusers
text-to-image pipeline (SD1.5/2.1 and SDXL: scaling only; SD3/FLUX VAEs: a shift too); SANA's deterministic DC-AE
(AutoencoderDC) gives its latent directly."""
from __future__ import annotations

import torch
from torch import nn


class VAECodec(nn.Module):
    """encode: images in [-1, 1] -> latents in the teacher's space; decode: the inverse (clamped to [-1, 1])."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)
        blocks = len(vae.config.get("block_out_channels") or vae.config.encoder_block_out_channels)
        self.factor = 2 ** (blocks - 1)  # pixels per latent along each side (8 for SD's 4-block VAE)
        self.latent_channels = int(vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Computed on the VAE's device; returned on the images' device (as decode)."""
        p = next(self.vae.parameters())
        out = self.vae.encode(images.to(p.device, p.dtype))
        mean = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
        return ((mean.float() - self.shift) * self.scale).to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        p = next(self.vae.parameters())
        out = [self.vae.decode((z.float() / self.scale + self.shift).to(p.device, p.dtype)).sample.float().clamp(-1, 1)
               for z in latents.split(batch_size)]
        return torch.cat(out).to(latents.device)
