"""The student as one checkpoint file in the original Stable Diffusion layout: what A1111 / Forge
(`models/Stable-diffusion`) and ComfyUI's CheckpointLoaderSimple load, and diffusers' `from_single_file`.

One .safetensors holds the student's UNet (adapters fused) under `model.diffusion_model.`, the teacher's VAE under
`first_stage_model.` and its text encoders: SD 1.x's CLIP under `cond_stage_model.transformer.`; SD 2.x's OpenCLIP
ViT-H under `cond_stage_model.model.`; SDXL's CLIP-L under `conditioner.embedders.0.transformer.` and its OpenCLIP
bigG under `conditioner.embedders.1.model.` (OpenCLIP's own names: q, k, v fused into one in_proj, the projection as a
matrix). An SD 2.x file holds the text tower as diffusers keeps it: SD 2.x reads the penultimate layer, so diffusers'
conversion drops the 24th layer and the projection, which never run; they are not in the file, and A1111, Forge and
ComfyUI, which load checkpoints non-strictly, report them missing and run the same 23 layers.

Why a table of our own: diffusers converts original -> diffusers inside the library (loaders/single_file_utils.py)
but ships the reverse only as a script outside the package. The layout differs from diffusers' by block renames
that follow from the UNet's and VAE's configs, so the mapping below is a list of (diffusers prefix, original prefix)
pairs built from the config plus a few renames inside resnet and attention blocks. Every key must map: a key the
table does not cover is an error, never written under its diffusers name.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from ..models.lora import merged
from .weights import DTYPES, check_out, export_metadata, write_atomic

# inside a UNet resnet block: diffusers name -> original (ResBlock) name
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# inside a VAE resnet block and the VAE's mid attention
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, original prefix, renames inside the block) of a UNet2DConditionModel with this config:
    input_blocks count 1 + (layers + 1) per level (the last being the downsampler), output_blocks layers + 1 per
    level with the upsampler after the level's last resnet (and attention, where the level has one)."""
    n, per = len(config.block_out_channels), config.layers_per_block
    if not isinstance(per, int):
        raise InputError(f"layers_per_block={per}: the original layout needs the same number of layers per level")
    out = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
           ("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {}),
           ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
           ("mid_block.attentions.0.", "middle_block.1.", {})]
    out += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", UNET_RESNET) for j in range(2)]
    for i in range(n):
        for j in range(per):
            k = 1 + i * (per + 1) + j
            out += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET),
                    (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", {})]
        out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", {}))
        for j in range(per + 1):
            k = i * (per + 1) + j
            out += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", UNET_RESNET),
                    (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", {})]
        attention = "CrossAttn" in config.up_block_types[i]
        out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (per + 1) + per}.{2 if attention else 1}.",
                    {}))
    return out


def vae_prefixes(config) -> list[tuple[str, str, dict]]:
    """The same for an AutoencoderKL: the decoder's levels are numbered from the bottom in the original layout."""
    n, out = len(config.block_out_channels), []
    for part in ("encoder", "decoder"):
        out += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET) for j in range(2)]
        out += [(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION),
                (f"{part}.conv_norm_out.", f"{part}.norm_out.", {})]
    for i in range(n):
        out.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
        out.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", {}))
        for j in range(config.layers_per_block + 1):
            out += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET),
                    (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET)]
    return out


def to_original(state: dict, prefixes: list[tuple[str, str, dict]], unchanged: tuple[str, ...]) -> dict:
    """`state` with diffusers keys renamed by `prefixes`; keys starting with one of `unchanged` keep their name (the
    same in both layouts); any other key is an error."""
    out = {}
    for key, value in state.items():
        for old, new, inner in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner.items():
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[new + rest] = value
                break
        else:
            if not key.startswith(unchanged):
                raise RuntimeError(f"no original-layout name for the diffusers key {key!r}")
            out[key] = value
    return out


def clip_state(encoder) -> dict:
    """transformers' CLIPTextModel keys as they were saved in 2022, under `text_model.` (which transformers 5 no
    longer puts in a CLIPTextModel's state dict): the layout of the original checkpoints."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in encoder.state_dict().items()}


OPEN_CLIP_LAYER = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def open_clip_state(encoder) -> dict:
    """An OpenCLIP text tower's keys from transformers' CLIPTextModelWithProjection (SDXL's bigG) or CLIPTextModel
    (SD 2.x's ViT-H, without the projection)."""
    state = dict(clip_state(encoder))
    out = {"token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
           "ln_final.bias": state.pop("text_model.final_layer_norm.bias")}
    if "text_model.text_projection.weight" in state:
        out["text_projection"] = state.pop("text_model.text_projection.weight").T  # OpenCLIP: x @ text_projection
    for i in range(encoder.config.num_hidden_layers):
        old, new = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{new}attn.in_proj_{kind}"] = torch.cat([state.pop(f"{old}self_attn.{x}_proj.{kind}") for x in "qkv"])
            out.update({f"{new}{b}.{kind}": state.pop(f"{old}{a}.{kind}") for a, b in OPEN_CLIP_LAYER})
    if state:
        raise RuntimeError(f"no original-layout name for the text encoder keys {sorted(state)}")
    return out


def original_state(unet, vae, encoders: dict) -> dict:
    """The original-layout state dict of a diffusers UNet, AutoencoderKL and the pipeline's text encoders (SD 1.x and
    2.x: text_encoder; SDXL: text_encoder and text_encoder_2)."""
    tensors = {f"model.diffusion_model.{k}": v for k, v in to_original(
        unet.state_dict(), unet_prefixes(unet.config), ()).items()}
    vae_state = to_original(vae.state_dict(), vae_prefixes(vae.config),
                            ("encoder.conv_", "decoder.conv_", "quant_conv.", "post_quant_conv."))
    for k, v in vae_state.items():  # the original mid attention projections are 1x1 convolutions
        if ".mid.attn_1." in k and k.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        tensors[f"first_stage_model.{k}"] = v
    if "text_encoder_2" in encoders:  # SDXL
        tensors.update({f"conditioner.embedders.0.transformer.{k}": v
                        for k, v in clip_state(encoders["text_encoder"]).items()})
        tensors.update({f"conditioner.embedders.1.model.{k}": v
                        for k, v in open_clip_state(encoders["text_encoder_2"]).items()})
    elif is_open_clip(encoders["text_encoder"]):  # SD 2.x
        tensors.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_state(encoders["text_encoder"]).items()})
    else:
        tensors.update({f"cond_stage_model.transformer.{k}": v
                        for k, v in clip_state(encoders["text_encoder"]).items()})
    return tensors


def is_open_clip(encoder) -> bool:
    """SD 2.x's text encoder is an OpenCLIP model (gelu), SD 1.x's OpenAI CLIP (quick_gelu)."""
    return encoder.config.hidden_act != "quick_gelu"


def export_single_file(run, out, dtype: str = "fp16"):
    """Write the student pipeline (UNet with adapters fused, the teacher's VAE and text encoders) as one
    original-layout .safetensors file in `dtype`, with the recipe and sampling times in its metadata."""
    from ..teachers.sd import SDTeacher

    teacher = run.teacher
    if hasattr(run.student, "routing"):
        raise InputError("--format single-file holds one UNet; this is a multi-student run: export it with "
                         "--format diffusers (one folder per student)")
    if not isinstance(teacher, SDTeacher) or teacher.family not in ("sd", "sdxl"):
        family = getattr(teacher, "family", run.recipe.teacher.name)
        raise InputError(f"--format single-file writes Stable Diffusion 1.x, 2.x and SDXL checkpoints; this run's "
                         f"teacher is {family!r}: use --format diffusers")
    encoders = {k: v for k, v in teacher.text.components().items() if k.startswith("text_encoder") and v is not None}
    out = check_out(out, "single-file")
    tensors = original_state(merged(run.student.net.net), teacher.codec.vae, encoders)
    write_atomic({k: v.detach().to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in tensors.items()}, out,
                 {**export_metadata(run), "stepdistill.layout": f"{teacher.family}-original",
                  "stepdistill.dtype": dtype})
    return out
