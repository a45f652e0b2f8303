"""A LoRA student as files other tools load: the diffusers/peft layout, the kohya (A1111 / ComfyUI) layout, and the
LCMScheduler config that samples the student's trained steps.

diffusers layout: `pytorch_lora_weights.safetensors`, keys `unet.<module>.lora_A.weight` / `lora_B.weight`
(`transformer.` for SD3, FLUX, SANA), the adapter's LoraConfig (rank, alpha, targets) in the metadata so
`pipe.load_lora_weights` rebuilds the same scale.
kohya layout: `<name>_kohya.safetensors`, keys `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` /
`.alpha` (`lora_transformer_` for transformers, the OneTrainer naming ComfyUI maps) with the real alpha (diffusers' own
converter writes alpha = rank), and `ss_*` metadata plus the intended steps, timesteps and scale. Module names are
diffusers' (`down_blocks_0_attentions_0_...`), which ComfyUI and diffusers map; kohya's original LDM naming
(`input_blocks_...`) is not written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import recipe as recipe_mod
from ..errors import InputError, MissingFileError
from ..hashing import file_sha256
from ..models.lora import is_lora
from .diffusers_folder import lcm_scheduler, pipeline_guidance, staged, start_note
from .weights import DTYPES

# kohya's ss_base_model_version
BASE_VERSION = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1", "sana": "sana"}

USAGE = """# {name}: a {steps}-step LoRA student distilled by stepdistill

(Run the code below from the folder that holds `{name}/`: its paths are relative to it, so the export can move.)

Base model: the teacher at `{base}` ({denoiser} weights sha256 `{base_sha}`). Load it on that base only.

diffusers:

```python
import torch
from diffusers import {scheduler}, {pipeline}

pipe = {pipeline}.from_pretrained("{base}")
pipe.scheduler = {scheduler}.from_pretrained("{path}", subfolder="scheduler")
pipe.load_lora_weights("{path}")  # pytorch_lora_weights.safetensors
# or, checking first that pipe has the base it was trained on:
# from stepdistill.export.lora import load_lora; load_lora(pipe, "{path}")
images = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance},  # trained steps: {timesteps}
              generator=torch.Generator().manual_seed(0)).images
```

ComfyUI / A1111: `{kohya}` (kohya layout, network dim {rank}, alpha {alpha}, strength 1.0), sampled with an LCM
sampler for {steps} step(s) at CFG 1.
"""


def _adapter(run):
    student = run.student
    if hasattr(student, "routing"):
        raise InputError("--format lora exports one student; this is a multi-student run")
    if not is_lora(student):
        raise InputError("--format lora needs a LoRA run (generator.lora_rank > 0); this run fine-tuned full weights: "
                         "use --format diffusers or --format safetensors")
    from ..teachers.sd import SDTeacher

    if not isinstance(run.teacher, SDTeacher) or run.teacher.folder is None:
        raise InputError("--format lora supports LoRA students of a local text-to-image pipeline folder (teacher sd)")
    return student.net.net


def base_fingerprint(unet: torch.nn.Module, modules: list[str]) -> str:
    """SHA-256 (16 hex) of the base weights of the adapted modules rounded to bfloat16: identifies the base a LoRA
    belongs to whether it was loaded in fp32 or bf16 (the norm for SD3, FLUX, SANA), without the adapters. A base
    stored in fp16 or fine-tuned reads as another base (a warning, not a refusal: see load_lora)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode())
        h.update(_base_weight(unet, name).detach().to(torch.bfloat16).view(torch.int16).cpu().contiguous().numpy()
                 .tobytes())
    return h.hexdigest()[:16]


def _base_weight(net: torch.nn.Module, name: str) -> torch.Tensor:
    module = net.get_submodule(name)
    return getattr(module, "base_layer", module).weight


def adapted_shapes(net: torch.nn.Module, modules: list[str]) -> dict[str, list[int]]:
    """The base weight shape of each adapted module: what must match for the LoRA to fit at all."""
    return {name: list(_base_weight(net, name).shape) for name in sorted(modules)}


def _adapted_modules(peft_state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in peft_state})


def load_lora(pipe, folder: str | Path, kohya: bool = False) -> None:
    """`pipe.load_lora_weights` for an exported student. Refuses a pipeline whose denoiser lacks an adapted layer or
    has it in another shape (another architecture: the LoRA cannot fit); warns, and loads, when the base weights
    differ from those it was distilled on (a fine-tune of that base, or the base stored in fp16), which is how
    step-distillation LoRAs are often used (LCM-LoRA, DMD2-LoRA) but may change the images."""
    import warnings

    folder = Path(folder)
    info_path = folder / "stepdistill.json"
    if not info_path.exists():
        raise MissingFileError(f"{folder} is not a stepdistill LoRA export (no stepdistill.json)")
    info = json.loads(info_path.read_text())
    modules = info["adapted_modules"]
    net = pipe.components.get("unet") or pipe.components.get("transformer")
    missing = [m for m in modules if not _has_module(net, m)]
    if missing:
        raise InputError(f"{folder} adapts layers this pipeline's denoiser does not have (e.g. {missing[0]}): it was "
                         f"exported for another architecture (base {info['base']})")
    expected, found_shapes = info.get("adapted_shapes", {}), adapted_shapes(net, modules)
    wrong = [m for m in expected if expected[m] != found_shapes[m]]
    if wrong:
        raise InputError(f"{folder} does not fit this pipeline's denoiser: layer {wrong[0]} has shape "
                         f"{found_shapes[wrong[0]]} here and {expected[wrong[0]]} in the base it was exported for "
                         f"({info['base']}): another architecture")
    found = base_fingerprint(net, modules)
    if found != info["base_fingerprint"]:
        warnings.warn(f"{folder} was distilled on other base weights (fingerprint {info['base_fingerprint']}, "
                      f"{info['base']}; this pipeline's denoiser has {found}): loading it all the same, as on a "
                      "fine-tune of that base; the images may differ from the student's", stacklevel=2)
    pipe.load_lora_weights(folder, weight_name=f"{folder.name}_kohya.safetensors" if kohya else None)


def _has_module(net: torch.nn.Module, name: str) -> bool:
    try:
        net.get_submodule(name)
        return True
    except AttributeError:
        return False


def kohya_state(peft_state: dict[str, torch.Tensor], alpha: float, prefix: str = "lora_unet_"
                ) -> dict[str, torch.Tensor]:
    """peft keys (`<module>.lora_A.weight`) -> kohya keys for the denoiser, with one `.alpha` per module."""
    out = {}
    for key, value in peft_state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def export_lora(run, out: str | Path, dtype: str = "fp32") -> Path:
    """Write out/pytorch_lora_weights.safetensors, out/<name>_kohya.safetensors (adapters in `dtype`), out/scheduler/
    and a README."""
    import diffusers
    from peft import get_peft_model_state_dict

    net, teacher = _adapter(run), run.teacher
    denoiser = teacher.denoiser
    config = net.peft_config["default"]
    state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in get_peft_model_state_dict(net).items()}
    scheduler, timesteps = lcm_scheduler(run)  # (refuses a start no stock scheduler reproduces, before writing)
    out = Path(out)
    with staged(out) as tmp:
        getattr(diffusers, teacher.pipeline).save_lora_weights(
            tmp, **{f"{denoiser}_lora_layers": state, f"{denoiser}_lora_adapter_metadata": config.to_dict()},
            weight_name="pytorch_lora_weights.safetensors")
        scheduler.save_pretrained(tmp / "scheduler")
        single = getattr(teacher, "single_file", None)  # a single-file teacher: the base is that file, not the config's
        weights = [single] if single else sorted((teacher.folder / denoiser).glob("*.safetensors"))
        base_sha = file_sha256(weights[0]) if len(weights) == 1 else "n/a (sharded or not safetensors)"
        modules = _adapted_modules(state)
        fingerprint = base_fingerprint(net, modules)
        steps = run.student.steps
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                "ss_network_alpha": str(config.lora_alpha), "ss_base_model_version": BASE_VERSION[teacher.family],
                "stepdistill.steps": str(steps), "stepdistill.timesteps": json.dumps(timesteps),
                "stepdistill.start_t": str(run.student.start_t), "stepdistill.start_noise": run.student.start_noise,
                "stepdistill.scheduler": type(scheduler).__name__,
                "stepdistill.guidance_scale": str(pipeline_guidance(run)),
                "stepdistill.lora_scale": "1.0", "stepdistill.base_unet_sha256": base_sha,
                "stepdistill.base_fingerprint": fingerprint,
                "stepdistill.iteration": str(run.step), "stepdistill.recipe": recipe_mod.dump(run.recipe)}
        kohya = f"{out.name}_kohya.safetensors"
        save_file(kohya_state(state, config.lora_alpha, f"lora_{denoiser}_"), tmp / kohya, metadata=meta)
        info = {k.removeprefix("stepdistill."): v for k, v in meta.items() if k != "stepdistill.recipe"}
        info.update(base=str(single or teacher.folder), adapted_modules=modules,
                    adapted_shapes=adapted_shapes(net, modules), base_fingerprint=fingerprint)
        (tmp / "stepdistill.json").write_text(json.dumps(info, indent=2))
        (tmp / "README.md").write_text(USAGE.format(
            name=out.name, steps=steps, base=single or teacher.folder, base_sha=base_sha, path=out.name,
            timesteps=timesteps, kohya=kohya, rank=config.r, alpha=config.lora_alpha, pipeline=teacher.pipeline,
            denoiser=denoiser, scheduler=type(scheduler).__name__, guidance=pipeline_guidance(run))
            + start_note(run.student, timesteps))
    return out
