"""Generate -> features -> metrics, for the student (its K steps) and the teacher (an ODE solver at `teacher_nfe`).

The domain metric is the teacher's (`teacher.domain` names one of eval/domains.py's, or a plug-in's); FID/KID
(eval/fid.py) score image teachers against any reference. The protocol is written next to every number.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from .. import parallel, registry
from ..diffusion.solvers import ode_nfe, sample_ode, solver_for_nfe
from ..errors import InputError, RecipeError
from ..models.generator import Generator
from ..models.score import device_of


def _batches(n: int, batch_size: int, shard: bool, desc: str, quiet: bool):
    """(index, first row, rows) of each batch of n, with `mine`: whether this process generates it. With `shard`,
    process r of R takes the r-th contiguous block of batches, so gathering in process order keeps the batch order;
    the others still draw the batch's noise, so every process's seeded stream stays where one process's would be."""
    starts = list(range(0, n, batch_size))
    r, world = (parallel.rank(), parallel.world()) if shard else (0, 1)
    lo, hi = len(starts) * r // world, len(starts) * (r + 1) // world
    for b in tqdm(range(len(starts)), desc=desc, disable=quiet or r > 0, leave=False):
        yield starts[b], min(batch_size, n - starts[b]), lo <= b < hi


@torch.no_grad()
def generate_student(student: Generator, teacher, n: int, seed: int, batch_size: int, steps: int | None = None,
                     quiet: bool = True, classes: list[int] | None = None, shard: bool = False) -> torch.Tensor:
    """n samples from the student (a Generator or a MultiStudent) with noise and fresh per-step noise drawn from one
    seeded generator; conditions from `teacher.eval_cond`. `shard`: every process calls this and generates its share
    of the batches; all of them get all n samples, the same as one process makes. Noise comes from the CPU's
    stream (the same samples on any device); the samples are returned on the CPU."""
    gen, device = torch.Generator().manual_seed(seed), device_of(student)
    cond = teacher.eval_cond(n, classes)
    k = steps or student.steps
    out = []
    for i, m, mine in _batches(n, batch_size, shard, "student samples", quiet):
        z = torch.randn(m, *teacher.shape, generator=gen)
        fresh = iter([torch.randn(m, *teacher.shape, generator=gen) for _ in range(k - 1)])  # each later step's noise
        if mine:
            c = None if cond is None else cond[i:i + m].to(device)
            out.append(student(z.to(device), c, steps=steps, noise=lambda fresh=fresh: next(fresh).to(device)).cpu())
    return torch.cat(parallel.gather(out) if shard else out)


@torch.no_grad()
def generate_teacher(teacher, n: int, seed: int, batch_size: int, nfe: int, guidance_scale: float = 1.0,
                     quiet: bool = True, shard: bool = False,
                     classes: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """(n samples, NFE actually used) of the teacher's probability-flow ODE asked to use `nfe` evaluations (guided
    if guidance_scale != 1). Where t = 1 is (nearly) pure noise — flow, cosine VP — the first Heun correction is
    skipped, so 35 asked gives 34 used. `shard` and `classes` as for generate_student."""
    solver, steps = solver_for_nfe(nfe)
    gen = torch.Generator().manual_seed(seed)
    cond = teacher.eval_cond(n, classes)
    score = teacher.score
    device = device_of(score)
    out = []
    for i, m, mine in _batches(n, batch_size, shard, f"teacher samples ({nfe} NFE)", quiet):
        z = torch.randn(m, *teacher.shape, generator=gen) * score.schedule.init_sigma
        if mine:
            c = None if cond is None else cond[i:i + m].to(device)
            out.append(sample_ode(lambda x, t, c=c: score.guided(x, t, c, guidance_scale), z.to(device),
                                  score.schedule, steps, heun=solver == "heun")[0].cpu())
    return torch.cat(parallel.gather(out) if shard else out), ode_nfe(steps, score.schedule, heun=solver == "heun")


def protocol(recipe, teacher) -> dict:
    e = recipe.eval
    solver, steps = solver_for_nfe(e.teacher_nfe)
    p = {"domain": teacher.domain, "n": e.n, "seed": e.seed, "teacher_nfe": e.teacher_nfe,
         "teacher_solver": f"{solver}, {steps} steps, Karras rho=7 times", "guidance_scale": e.guidance_scale}
    metric = domain_metric(teacher)
    if metric is not None:
        p.update(metric.protocol(e))
    if hasattr(teacher, "eval_prompt_list"):  # text-to-image: the prompts are part of the protocol
        digest = hashlib.sha256("\n".join(teacher.eval_prompts).encode()).hexdigest()[:16]
        p["eval_prompts"] = f"{len(teacher.eval_prompts)} prompts, cycled (sha256 {digest})"
    if image_metrics(e) or "clip" in e.metrics:  # only then: cached teacher scores are matched on the domain-only one
        p["metrics"] = list(e.metrics)
    if "clip" in e.metrics:
        from .clip import clip_model_id

        p["clip_model"] = clip_model_id(e.clip)
    return p


def image_metrics(e) -> tuple[str, ...]:
    """eval.metrics' Inception metrics (FID, KID)."""
    return tuple(m for m in e.metrics if m in ("fid", "kid"))


def check_image_metrics(e, teacher, name: str) -> None:
    """eval.metrics' FID/KID/CLIP against what teacher `name` can give them: image samples and a reference
    (eval.reference or the teacher's built-in data) for FID/KID, prompts and a CLIP model (eval.clip) for CLIP; a
    RecipeError naming the fix. Checked before training (training/build.py's resolve_eval) and before scoring
    (evaluate)."""
    if "clip" in e.metrics:
        from .clip import clip_folder

        if not hasattr(teacher, "eval_prompt_list"):
            raise RecipeError(f"eval.metrics {list(e.metrics)}: CLIP score needs a text-to-image teacher (its samples "
                              f"have prompts); teacher {name!r} has none: drop clip from eval.metrics")
        clip_folder(e.clip)
    if not image_metrics(e):
        return
    if not teacher.is_image:
        raise RecipeError(f"eval.metrics {list(e.metrics)}: FID and KID need an image teacher, this one makes "
                          f"{teacher.shape} vectors; use eval.metrics=[domain]")
    if e.reference is None and teacher.domain == "none":
        raise RecipeError(f"eval.metrics {list(e.metrics)} needs a reference for teacher {name!r} (it has no built-in "
                          "data): set eval.reference to a stats .npz (`stepdistill eval ref`), an image folder or a "
                          "dataset name")


class ImageScorer:
    """Inception FID/KID of [-1, 1] samples under the recipe's eval settings (reference found or computed once)."""

    def __init__(self, e, teacher, quiet: bool = True) -> None:
        from .fid import reference_for
        from .inception import InceptionFeatures

        spec = e.reference or teacher.domain  # (check_image_metrics has made sure there is one)
        self.e, self.quiet = e, quiet
        self.features = InceptionFeatures(e.fid_backend, e.inception)
        self.reference = reference_for(spec, self.features, quiet=quiet)

    def protocol(self) -> dict:
        return {**self.reference["protocol"], **self.features.protocol(), "kid_subset_size": self.e.kid_subset_size}

    def __call__(self, samples: torch.Tensor, who: str) -> dict:
        from .fid import image_scores
        from .images import as_uint8

        return image_scores(as_uint8(samples), self.reference, self.features, image_metrics(self.e),
                            self.e.kid_subset_size, self.e.seed, self.quiet, desc=f"Inception features ({who})")


def domain_metric(teacher):
    """The teacher's domain metric (eval/domains.py), or None for a teacher without one (domain "none")."""
    if teacher.domain == "none":
        return None
    return registry.get("domain", teacher.domain)(teacher)


def domain_reference(teacher, n: int, seed: int, cond: torch.Tensor | None = None,
                     split: str = "test") -> torch.Tensor | str:
    """What the domain metric compares against: exact mixture samples for gmm (their seed set by the split); the
    split's name where the reference is a data set's statistics."""
    metric = domain_metric(teacher)
    return split if metric is None else metric.reference(n, seed, cond, split)


def domain_score(teacher, samples: torch.Tensor, reference: torch.Tensor | str) -> dict:
    """The domain metric of samples in the teacher's space (latent teachers' are decoded by the metric); {} for a
    teacher without one."""
    metric = domain_metric(teacher)
    return {} if metric is None else metric.score(samples, reference)


@torch.no_grad()
def curve_score(e, teacher, student: Generator, classes: list[int] | None = None) -> dict:
    """The domain metric on `e.curve_n` samples with fixed noise: a point of the metric-versus-time curve, cheap
    enough to take during training without moving its random stream."""
    was_training = student.training
    student.eval()
    with torch.random.fork_rng(devices=[]):
        xs = generate_student(student, teacher, e.curve_n, e.seed, e.batch_size, classes=classes, shard=True)
        cond = None if classes is None else teacher.eval_cond(e.curve_n, classes)
        score = parallel.on_main(lambda: domain_score(teacher, xs, domain_reference(teacher, e.curve_n, e.seed, cond,
                                                                                    e.split)))
    student.train(was_training)
    return score


def cached_teacher_metrics(teacher, proto: dict) -> dict | None:
    """The teacher's metrics under protocol `proto` from its folder's quality.json (naming that file as `cached`), or
    None where the teacher has no folder, no such file or no entry with exactly this protocol."""
    path = getattr(teacher, "folder", None)
    if path is None or not (path / "quality.json").exists():
        return None
    for entry in json.loads((path / "quality.json").read_text()).get("entries", []):
        if entry["protocol"] == proto:
            return {**entry["teacher"], "cached": str(path / "quality.json")}
    return None


def evaluate(recipe, teacher, student: Generator, quiet: bool = False, recompute_teacher: bool = False,
             steps: int | None = None) -> dict:
    """Metrics of student and teacher under the recipe's eval protocol (the dict written to metrics.json); `steps`:
    sample the student with that many steps instead of its trained K (the few-step rule)."""
    e = recipe.eval
    if "domain" in e.metrics and teacher.domain == "none":
        raise InputError("this teacher has no built-in evaluation domain; score it with Inception metrics instead: "
                         "eval.metrics=[fid,kid] eval.reference=<stats .npz, image folder or dataset>, or with CLIP "
                         "score (text-to-image): eval.metrics=[clip] eval.clip=<CLIP model folder>")
    check_image_metrics(e, teacher, recipe.teacher.name)
    proto = protocol(recipe, teacher)
    # with several processes each generates its share of the samples; process 0 alone scores them (and computes or
    # caches reference statistics), then hands the result to all
    scorer = ImageScorer(e, teacher, quiet) if image_metrics(e) and parallel.is_main() else None
    if scorer is not None:
        proto["inception"] = scorer.protocol()

    def score(samples: torch.Tensor, who: str) -> dict:
        out = domain_score(teacher, samples, domain_reference(teacher, e.n, e.seed, split=e.split)) \
            if "domain" in e.metrics else {}
        images = teacher.decode(samples) if scorer is not None or "clip" in e.metrics else None
        if scorer is not None:
            out.update(scorer(images, who))
        if "clip" in e.metrics:  # each sample's prompt: the teacher's evaluation prompts in sampling order
            from .clip import clip_score
            from .images import as_uint8

            prompts = teacher.eval_prompt_list(len(images))
            out["clip_score"] = clip_score(as_uint8(images), prompts, e.clip)
        return out

    student.eval()
    xs = generate_student(student, teacher, e.n, e.seed, e.batch_size, steps=steps, quiet=quiet, shard=True)
    result = {"student": {"nfe": steps or student.steps, **parallel.on_main(lambda: score(xs, "student"))}}
    if hasattr(student, "routing"):  # a multi-student ensemble: say how labels were routed
        result["student"]["routing"] = student.routing()
    cached = None if recompute_teacher else parallel.on_main(lambda: cached_teacher_metrics(teacher, proto))
    if cached is not None:
        result["teacher"] = cached
    else:
        xt, nfe = generate_teacher(teacher, e.n, e.seed, e.batch_size, e.teacher_nfe, e.guidance_scale, quiet=quiet,
                                   shard=True)
        result["teacher"] = {"nfe": nfe, **parallel.on_main(lambda: score(xt, "teacher"))}
    metric = domain_metric(teacher)
    baseline = metric.baseline(e.n, e.seed) if metric is not None and "domain" in e.metrics else None
    if baseline is not None:  # e.g. gmm: what knowing the data's mean and covariance alone scores
        result["baseline"] = {"nfe": "-", "model": metric.baseline_model,
                              **parallel.on_main(lambda: score(baseline, "baseline"))}
    result["protocol"] = parallel.on_main(lambda: proto)
    key = main_metric(result["student"])  # KID is unbiased and may be <= 0 for a near-perfect teacher: no ratio then
    result["ratio"] = result["student"][key] / result["teacher"][key] if result["teacher"][key] > 0 else None
    return result


def main_metric(scores: dict) -> str:
    """The number a run is ranked by: its domain metric, else FID, else KID (a plug-in's domain metric: the first
    entry of its scores)."""
    known = next((k for k in ("fd", "energy_distance", "fid", "kid") if k in scores), None)
    return known or next(k for k, v in scores.items() if k != "nfe" and isinstance(v, (int, float)))


def write_metrics(outdir: Path, metrics: dict, name: str = "metrics.json") -> Path:
    path = Path(outdir) / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(path)
    return path


LABELS = {"fd": "FD", "energy_distance": "energy distance", "near_share": "near share",
          "worst_mass_error": "worst mass err", "fid": "FID", "kid": "KID"}


def format_table(metrics: dict) -> str:
    keys = [k for k in LABELS if k in metrics["student"]]
    rows = [("teacher", metrics["teacher"]), ("student", metrics["student"])]
    rows += [("gaussian", metrics["baseline"])] if "baseline" in metrics else []
    lines = [f"{'':8} {'NFE':>4}" + "".join(f" {LABELS[k]:>16}" for k in keys)]
    lines += [f"{name:8} {m['nfe']:>4}" + "".join(f" {m[k]:>16.4f}" for k in keys)
              + ("  (cached)" if m.get("cached") else "") for name, m in rows]
    ratio = "n/a (teacher's value <= 0)" if metrics["ratio"] is None else f"{metrics['ratio']:.2f}x"
    lines.append(f"student / teacher = {ratio} {LABELS[main_metric(metrics['student'])]}   "
                 f"(n={metrics['protocol']['n']}, seed={metrics['protocol']['seed']})")
    if "near_share" in keys:
        lines.append("near share: samples within the radius holding 99% of a component's exact samples; worst mass "
                     "err: max over components of |share - weight| / weight")
    if "baseline" in metrics:
        lines.append(f"gaussian: {metrics['baseline']['model']}")
    return "\n".join(lines)
