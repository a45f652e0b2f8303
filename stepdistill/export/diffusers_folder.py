"""A diffusers folder for the student: unet/ plus an LCMScheduler whose config reproduces the student's steps.

LCMScheduler's sampling rule is the generator's (predict x0, re-noise with fresh noise to the next time), and with
`original_inference_steps=K` its `set_timesteps(K)` yields exactly the trained times (999, 749, 499, 249 for K=4),
so users need no `timesteps=[...]` argument.

A multi-student run becomes one such folder per student (`student_k/`, each a complete pipeline folder that loads
on its own) plus `routing.json` (rule and classes) and a README with the routing loop: diffusers has no notion of
routing, and separate folders keep every student loadable with the plain calls above.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import recipe as recipe_mod
from .. import registry
from ..errors import InputError, MissingFileError, OutputExistsError
from .weights import cast_folder

USAGE = """# {name}: a {steps}-step student distilled by stepdistill

(Run the code below from the folder that holds `{name}/`: its paths are relative to it, so the export can move.)

```python
import torch
from diffusers import LCMScheduler, {model_cls}

unet = {model_cls}.from_pretrained("{path}", subfolder="unet")
scheduler = LCMScheduler.from_pretrained("{path}", subfolder="scheduler")
scheduler.set_timesteps({steps})  # the trained steps: {timesteps}
generator = torch.Generator().manual_seed(0)
x = torch.randn(10, {channels}, {size}, {size}, generator=generator) * scheduler.init_noise_sigma
labels = torch.arange(10)  # class labels{label_note}
for t in scheduler.timesteps:
    with torch.no_grad():
        out = unet(x, t, class_labels=labels).sample
    x = scheduler.step(out, t, x, generator=generator).prev_sample
images = (x.clamp(-1, 1) + 1) / 2
```
"""


ROUTED_USAGE = """# {name}: {students} students distilled by stepdistill (multi-student distillation)

(Run the code below from the folder that holds `{name}/`: its paths are relative to it, so the export can move.)

Class c is served by student c * {students} // {num_classes}, i.e. `student_k/` for k in routing.json's order:
{table}

```python
import json, torch
from diffusers import LCMScheduler, UNet2DModel

routing = json.load(open("{path}/routing.json"))
k = 0  # the student of the labels you want, e.g. label * routing["students"] // routing["num_classes"]
unet = UNet2DModel.from_pretrained("{path}/student_%d" % k, subfolder="unet")
scheduler = LCMScheduler.from_pretrained("{path}/student_%d" % k, subfolder="scheduler")
# ... then sample exactly as in student_k/README.md, with labels from routing["classes"][k]
```
"""


def staging(out: Path) -> Path:
    """A new empty hidden folder beside `out` that an export is written into before `publish` moves it to `out`.
    An `out` holding anything but a previous export (its stepdistill.json or routing.json) is refused before any
    work: exporting never deletes or overwrites a user's files."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and
                         not any((out / f).exists() for f in ("stepdistill.json", "routing.json"))):
        raise OutputExistsError(f"--out {out} exists and is not a stepdistill export (it has no stepdistill.json); "
                                "choose another --out: nothing was written")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


def publish(tmp: Path, out: Path) -> Path:
    """Move a finished export into place, replacing a previous export there (staging checked it is one); the previous
    one is only deleted once the new one is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
    return out


@contextmanager
def staged(out: Path):
    """A block writing an export into `staging(out)`: published to `out` when the block succeeds, removed when not."""
    tmp = staging(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)


def export_diffusers(run, out: str | Path, dtype: str = "fp32") -> Path:
    """Write `out/unet`, `out/scheduler`, `out/stepdistill.json` and a README with the sampling loop (a multi-student
    run: `out/student_k/` with those for each student, plus `out/routing.json` and a README); weights in `dtype`."""
    from diffusers import UNet2DModel

    from ..teachers.sd import SDTeacher

    if hasattr(run.student, "routing"):
        return _export_students(run, Path(out), dtype)

    if isinstance(run.teacher, SDTeacher):
        return _export_pipeline(run, Path(out), dtype)
    net = run.student.net.net
    if not isinstance(net, UNet2DModel) or run.teacher.folder is None:
        raise InputError(f"--format diffusers needs a student built from a diffusers UNet teacher folder; this run's "
                         f"teacher is {run.recipe.teacher.name!r}. Use --format safetensors instead.")
    scheduler, timesteps = lcm_scheduler(run)
    out = Path(out)
    with staged(out) as tmp:
        net.save_pretrained(tmp / "unet", safe_serialization=True)
        cast_folder(tmp, dtype)
        scheduler.save_pretrained(tmp / "scheduler")
        meta = json.loads((run.teacher.folder / "stepdistill.json").read_text()) if (
            run.teacher.folder / "stepdistill.json").exists() else {}
        meta.update({"student_steps": run.student.steps, "timesteps": timesteps, "start_t": run.student.start_t,
                     "start_noise": run.student.start_noise, "iteration": run.step,
                     "recipe": recipe_mod.to_dict(run.recipe)})
        (tmp / "stepdistill.json").write_text(json.dumps(meta, indent=2))
        c = net.config
        (tmp / "README.md").write_text(USAGE.format(
            name=out.name, steps=run.student.steps, model_cls="UNet2DModel", path=out.name, timesteps=timesteps,
            channels=c.in_channels, size=c.sample_size,
            label_note=f"; {meta['null_label']} = unconditional" if "null_label" in meta else "")
            + start_note(run.student, timesteps))
    return out


PIPELINE_USAGE = """# {name}: a {steps}-step text-to-image student distilled by stepdistill

(Run the code below from the folder that holds `{name}/`: its paths are relative to it, so the export can move.)

A complete {pipeline} folder: the teacher's VAE and text encoders, the student's {denoiser}{fused}, and a
{scheduler} whose default is the trained steps ({timesteps}), so no `timesteps=` or `sigmas=` argument is needed.
{steps_note}
```python
import torch
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{path}")
images = pipe("a prompt", num_inference_steps={steps}, guidance_scale={guidance},
              generator=torch.Generator().manual_seed(0)).images
```
"""


GLOBAL_NOISE_NOTE = """
{pipeline} does not pass `generator` to the scheduler, so the fresh noise between steps comes from torch's global
generator: call `torch.manual_seed(...)` as well for reproducible multi-step samples.
"""


def _export_pipeline(run, out: Path, dtype: str) -> Path:
    """A text-to-image student as a full pipeline folder of the teacher's family (adapters fused), loadable with
    from_pretrained alone: the teacher's own VAE, text encoders and tokenizers, the student's network and the
    few-step scheduler."""
    import diffusers

    from ..models.lora import is_lora, merged

    scheduler, timesteps = lcm_scheduler(run)
    net, teacher, guidance = run.student.net.net, run.teacher, pipeline_guidance(run)
    extra = {"sd": dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False),
             "sdxl": dict(force_zeros_for_empty_prompt=teacher.text.null == "zeros", add_watermarker=False),
             }.get(teacher.family, {})
    denoiser = merged(net)
    no_cfg = teacher.family in ("sd", "sdxl") and denoiser.config.time_cond_proj_dim is None
    if no_cfg:
        denoiser = without_cfg(denoiser)
    parts = {"vae": teacher.codec.vae, "scheduler": scheduler, teacher.denoiser: denoiser,
             **teacher.text.components(), **extra}
    pipe = getattr(diffusers, teacher.pipeline)(**parts)
    with staged(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        cast_folder(tmp, dtype)
        meta = {"student_steps": run.student.steps, "timesteps": timesteps, "start_t": run.student.start_t,
                "start_noise": run.student.start_noise, "iteration": run.step,
                "guidance_scale": guidance, "recipe": recipe_mod.to_dict(run.recipe)}
        (tmp / "stepdistill.json").write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(PIPELINE_USAGE.format(
            name=out.name, steps=run.student.steps, timesteps=timesteps, path=out.name, pipeline=teacher.pipeline,
            guidance=guidance, steps_note=steps_note(run, no_cfg),
            denoiser=teacher.denoiser, scheduler=type(scheduler).__name__,
            fused=" (LoRA adapters fused into it)" if is_lora(net) else "") + (
            GLOBAL_NOISE_NOTE.format(pipeline=teacher.pipeline) if teacher.family in ("sd3", "flux") else "")
            + start_note(run.student, timesteps))
    return out


def without_cfg(unet):
    """The UNet with a zero guidance projection (`time_cond_proj_dim`, diffusers' LCM mechanism): the SD and SDXL
    pipelines skip classifier-free guidance for such a UNet and add cond_proj(embedding of guidance_scale) = 0 to its
    time embedding, so the pipeline's default `guidance_scale` (7.5, 5.0) gives the student's own images instead of
    guiding a student that was trained without it. Built on the meta device and filled from the UNet's weights."""
    with torch.device("meta"):
        out = type(unet).from_config({**unet.config, "time_cond_proj_dim": 256})
    weight = out.time_embedding.cond_proj.weight
    state = {**unet.state_dict(), "time_embedding.cond_proj.weight": torch.zeros(
        weight.shape, dtype=unet.time_embedding.linear_1.weight.dtype, device=unet.device)}
    out.load_state_dict(state, assign=True)
    if any(t.is_meta for t in (*out.parameters(), *out.buffers())):
        raise RuntimeError("the UNet with a guidance projection kept tensors on the meta device")
    return out.eval()


def lcm_scheduler(run):
    """(scheduler, its timesteps): the teacher's noise schedule with the student's trained steps as its default,
    checked to reproduce the trained times and input scale. DDPM-family teachers get an LCMScheduler; flow-matching
    teachers a FlowMatchLCMScheduler (the same rule: predict x0, re-noise to the next sigma), unshifted, with
    `shift_terminal=1/K` so that its K sigmas are the student's 1, 1 - 1/K, ..., 1/K.

    A DDPM student that starts below t = 1 (generator.start_t, its grid over the teacher's first D timesteps) gets an
    LCMScheduler of those D timesteps: `num_train_timesteps=D` and `trained_betas` the teacher's first D betas, so
    alphabar_t is the teacher's for every t < D and `set_timesteps(K)` yields the student's times (DMD2's 399).

    How many steps a pipeline may ask for: a consistency-family student (sCM, TBCM: `Objective.multistep`) any
    number (`original_inference_steps` = D, whose K-step subset is the same LCM grid), so `pipe(prompt)` with the
    pipeline's default 50 runs; any other student only its trained K (LCMScheduler refuses more: a DMD-style
    student's images come from its trained steps alone)."""
    from diffusers import FlowMatchLCMScheduler, LCMScheduler

    student = run.student
    teacher_sched = json.loads((run.teacher.folder / "scheduler" / "scheduler_config.json").read_text())
    k = student.steps
    start_t = student.start_t
    if student.schedule.name == "flow":
        if start_t < 1:
            raise InputError(f"generator.start_t={start_t}: a flow-matching student that starts below t = 1 has no "
                             "stock diffusers scheduler whose defaults reproduce it (FlowMatchLCMScheduler always "
                             "starts at sigma 1); export it with --format safetensors (its metadata has the times)")
        n = teacher_sched.get("num_train_timesteps", 1000)
        scheduler = FlowMatchLCMScheduler(num_train_timesteps=n, shift=1.0, shift_terminal=1 / k if k > 1 else None)
        scheduler.set_timesteps(k)
        timesteps = [round(float(t), 3) for t in scheduler.timesteps]
        expected = [round(t * n, 3) for t in student.times]
        ok = all(abs(a - b) < 1e-2 for a, b in zip(timesteps, expected)) and len(timesteps) == len(expected)
    elif student.schedule.discrete:
        keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                "rescale_betas_zero_snr")
        d = round(start_t * student.schedule.num_steps)
        multistep = registry.get("objective", run.recipe.objective.name).multistep
        config = dict({key: v for key, v in teacher_sched.items() if key in keep},
                      original_inference_steps=d if multistep else k, clip_sample=False, set_alpha_to_one=True,
                      timestep_spacing="leading", timestep_scaling=10.0)
        scheduler = LCMScheduler(**config)
        if d < scheduler.config.num_train_timesteps:  # the teacher's first d timesteps
            full = scheduler.alphas_cumprod
            scheduler = LCMScheduler(**dict(config, num_train_timesteps=d, trained_betas=scheduler.betas[:d].tolist(),
                                            rescale_betas_zero_snr=False))
            if not torch.equal(scheduler.alphas_cumprod, full[:d]):
                raise RuntimeError("the truncated LCMScheduler's alphas_cumprod differ from the teacher's")
        scheduler.set_timesteps(k)
        timesteps = scheduler.timesteps.tolist()
        expected = [round(t * (student.schedule.num_steps - 1)) for t in student.times]
        ok = timesteps == expected
    else:
        raise InputError(f"diffusers exports support DDPM-family and flow-matching teachers, not a "
                         f"{student.schedule.name!r} schedule")
    if not ok:  # guard: the exported scheduler must reproduce the trained times
        raise RuntimeError(f"{type(scheduler).__name__} gives timesteps {timesteps}, the student was trained at "
                           f"{expected}")
    scale = float(student.prior(torch.ones(1)))
    init_sigma = getattr(scheduler, "init_noise_sigma", 1.0)  # flow pipelines draw plain unit noise: no such attribute
    if abs(scale - init_sigma) > 1e-6 * max(1.0, scale):
        raise InputError(f"generator.start_noise={student.start_noise}: the student's first input is {scale:.6g} z, "
                         f"but {type(scheduler).__name__} always starts from init_noise_sigma = "
                         f"{init_sigma} z, so no stock scheduler's defaults reproduce it; export it "
                         "with --format safetensors, or train with generator.start_noise=pure (unit noise at the "
                         "start time, as DMD2's SDXL student)")
    return scheduler, timesteps


def pipeline_guidance(run) -> float:
    """The guidance_scale to give the exported pipeline: the scale the student's network takes as an input (FLUX-dev's
    embedded guidance, or the evaluation scale of a student trained on objective.guidance_set, which the SD pipelines
    embed for a UNet with time_cond_proj_dim and then skip classifier-free guidance), else 1.0 (no CFG)."""
    config = run.student.net.net.config
    embeds = getattr(config, "guidance_embeds", False) or getattr(config, "time_cond_proj_dim", None) is not None
    g = run.student.net.guidance_input if embeds else None  # FLUX-schnell carries a scale it does not read
    if g is not None and run.teacher.family == "sana":
        # SanaPipeline never passes `guidance` to the transformer; SANA-Sprint's own pipeline and scheduler do
        raise InputError("a SANA student with a guidance embedding (objective.guidance_set) needs SanaSprintPipeline "
                         "and its SCM scheduler, which this export does not write yet: export it with "
                         "--format safetensors")
    return 1.0 if g is None else float(g)


def steps_note(run, no_cfg: bool) -> str:
    """README lines on what the pipeline's default call does with this student (`no_cfg`: its UNet was given a zero
    guidance projection by `without_cfg`)."""
    k = run.student.steps
    if registry.get("objective", run.recipe.objective.name).multistep:
        out = (f"The student was trained for {k} step(s) and takes any number: `pipe(prompt)` runs the pipeline's "
               "default step count with the same rule.")
    else:
        out = (f"The student's images come from its {k} trained step(s) alone: the scheduler refuses more, so the "
               f"pipeline's default step count raises; pass `num_inference_steps={k}`.")
    if no_cfg:
        out += (" Its UNet carries a zero guidance projection (`time_cond_proj_dim`), so the pipeline skips "
                "classifier-free guidance and `guidance_scale` changes nothing: the student was trained to need none.")
    return out + "\n"


def start_note(student, timesteps: list) -> str:
    """README lines stating where a student that starts below t = 1 starts ('' for the default start)."""
    start_t = student.start_t
    if start_t >= 1:
        return ""
    return (f"\nThe student's first step runs at timestep {timesteps[0]} (generator.start_t = {start_t}) on pure "
            "unit noise, as DMD2's one-step SDXL student at 399. The scheduler holds the teacher's first "
            f"{round(start_t * student.schedule.num_steps)} training timesteps (`num_train_timesteps` and "
            "`trained_betas`: the teacher's own alphabar_t), so its defaults give these timesteps; a sampler that "
            "starts at the teacher's last timestep does not reproduce the student.\n")


def _export_students(run, out: Path, dtype: str) -> Path:
    routing = {**run.student.routing(), "iterations": run.student_steps, "folders": []}
    with staged(out) as tmp:
        for k, student in enumerate(run.student.students):
            folder = export_diffusers(dataclasses.replace(run, student=student, step=run.student_steps[k],
                                                          student_steps=None), tmp / f"student_{k}", dtype)
            classes = routing["classes"][k]
            meta = json.loads((folder / "stepdistill.json").read_text())
            (folder / "stepdistill.json").write_text(json.dumps({**meta, "classes": classes}, indent=2))
            readme = (folder / "README.md").read_text().replace(str(tmp), str(out))  # the folder's final place
            (folder / "README.md").write_text(readme + f"\nThis is student {k} of {routing['students']}: it was "
                                              f"distilled on classes {classes} only and should be given those labels "
                                              "(`stepdistill.json`'s classes); see ../routing.json.\n")
            routing["folders"].append(f"student_{k}")
        (tmp / "routing.json").write_text(json.dumps(routing, indent=2))
        table = "\n".join(f"- `student_{k}/`: classes {c}" for k, c in enumerate(routing["classes"]))
        (tmp / "README.md").write_text(ROUTED_USAGE.format(name=out.name, students=routing["students"],
                                                           num_classes=routing["num_classes"], table=table,
                                                           path=out.name))
    return out


@torch.no_grad()
def sample_exported(folder: str | Path, n: int, seed: int = 0, batch_size: int = 500,
                    prompts: list[str] | None = None) -> torch.Tensor:
    """n samples in [-1, 1] from an exported folder with plain diffusers (UNet2DModel + LCMScheduler, the README's
    loop), labels balanced (i % classes) when the UNet is class-conditional; one seeded generator for all noise, so
    a batch equals `stepdistill sample --run` of the run it came from with the same seed and batch size. A
    text-to-image pipeline folder is sampled with its own pipeline call at the trained steps, `prompts` cycled."""
    from diffusers import LCMScheduler, UNet2DModel

    folder = Path(folder)
    if (folder / "routing.json").exists():
        raise InputError(f"{folder} is a multi-student export; sample each student_k/ folder (it uses its own "
                         "classes, see routing.json)")
    if (folder / "model_index.json").exists():
        return sample_pipeline(folder, n, seed, batch_size, prompts)
    if not (folder / "unet" / "config.json").exists() or not (folder / "scheduler").exists():
        raise MissingFileError(f"{folder} is not an exported diffusers folder (expected unet/ and scheduler/)")
    try:  # a damaged or hand-edited folder: the libraries raise OSError, ValueError (JSON) or a safetensors error
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
        meta = json.loads((folder / "stepdistill.json").read_text()) if (folder / "stepdistill.json").exists() else {}
    except Exception as e:  # noqa: BLE001 (each library raises its own kinds)
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"{folder} does not load as an exported diffusers folder ({type(e).__name__}: {first}); "
                         "export it again with `stepdistill export --format diffusers`") from None
    steps = meta.get("student_steps", scheduler.config.original_inference_steps)
    n_cls = meta.get("null_label", unet.config.num_class_embeds)
    classes = torch.tensor(meta.get("classes") or range(n_cls or 0))  # a multi-student export's student: its own
    c, s = unet.config.in_channels, unet.config.sample_size
    gen, out = torch.Generator().manual_seed(seed), []
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        scheduler.set_timesteps(steps)  # per batch, as a pipeline call does: the scheduler counts its steps
        x = torch.randn(m, c, s, s, generator=gen) * scheduler.init_noise_sigma
        labels = None if not len(classes) else classes[torch.arange(i, i + m) % len(classes)]
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=gen).prev_sample
        out.append(x)
    return torch.cat(out)


def sample_pipeline(folder: Path, n: int, seed: int, batch_size: int, prompts: list[str] | None) -> torch.Tensor:
    """n images in [-1, 1] from an exported text-to-image pipeline folder, called as its README calls it (the trained
    steps and guidance), prompts cycled; one seeded generator for all batches."""
    import diffusers

    if not prompts:
        raise InputError(f"{folder} is a text-to-image export: give --prompt TEXT or --prompts FILE")
    meta_path = folder / "stepdistill.json"
    if not meta_path.exists():
        raise MissingFileError(f"{folder} has no stepdistill.json: export it again with `stepdistill export --format "
                               "diffusers`")
    meta = json.loads(meta_path.read_text())
    index = json.loads((folder / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    gen, out = torch.Generator().manual_seed(seed), []
    for i in range(0, n, batch_size):
        batch = [prompts[j % len(prompts)] for j in range(i, min(i + batch_size, n))]
        images = pipe(batch, num_inference_steps=meta["student_steps"], guidance_scale=meta["guidance_scale"],
                      generator=gen, output_type="pt").images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)
