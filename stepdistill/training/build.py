"""Building a run's networks from its recipe: teacher, generator, fake score, discriminator, real data and objective
(`build` -> `Built`), and the recipe checks that must fail before any training starts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import parallel
from ..devices import to_device
from ..models.generator import Generator
from ..models.score import student_guidance
from ..objectives.base import Batch, Nets, Objective
from ..recipe import Recipe, RecipeError
from ..registry import get
from ..teachers import Teacher, build_teacher


@dataclass
class Built:
    teacher: Teacher
    nets: Nets
    objective: Objective
    data: object | None = None  # real samples (`sample(n, cond)`) when the objective needs them
    classes: list[int] | None = None  # an MSD student's classes: conditions are drawn uniformly from these only
    device: torch.device = torch.device("cpu")  # where the networks compute (`to`)

    def to(self, device: torch.device) -> Built:
        """Move every network (teacher, trained networks, the objective's own) to `device`; batches then arrive
        there. Conditions and real samples are still drawn on the CPU, so a run draws the same numbers anywhere."""
        self.teacher.to(device)
        for name in ("generator", "fake_score", "discriminator"):
            net = getattr(self.nets, name)
            if net is not None:
                net.to(device)
        self.objective.to(device)
        self.device = torch.device(device)
        return self

    def sample_cond(self, n: int) -> torch.Tensor | None:
        return self.teacher.sample_cond(n, classes=self.classes)

    def batch(self, n: int) -> Batch:
        """One iteration's conditions and, for objectives that need them, real samples with the same conditions."""
        cond = self.sample_cond(n)
        x0 = self.data.sample(n, cond) if self.objective.uses_data else None
        to = lambda x: None if x is None else to_device(x, self.device)  # noqa: E731
        return Batch(n=n, cond=to(cond), x0=to(x0))

    def micro_batches(self, n: int, k: int) -> list[Batch]:
        """A global batch of n in k micro-batches, each cut into the processes' rows (parallel.py): micro-batch j
        holds the same rows whatever the number of processes."""
        return [Batch(parallel.local_batch(b.n), parallel.rows(b.cond), parallel.rows(b.x0))
                for b in self.batch(n).split(k)]


def build(recipe: Recipe, classes: list[int] | None = None) -> Built:
    """Teacher, networks (generator and fake score start from the teacher), real data and objective for a recipe.
    Everything a recipe lacks (real data, a network that can carry a discriminator) is reported here, before any
    training starts. `classes`: train one MSD student, on these classes only."""
    from ..models.discriminator import TeacherFeatureDiscriminator, build_discriminator

    teacher = build_teacher(recipe.teacher)
    check_generator(recipe, teacher)
    check_eval(recipe, teacher)
    obj_cls = get("objective", recipe.objective.name)
    needs = obj_cls.needs_for(recipe.objective)
    unknown = set(needs) - {"teacher", "fake_score", "discriminator", "data"}
    if unknown:
        raise RecipeError(f"objective {recipe.objective.name} needs {sorted(unknown)}, which this toolkit cannot "
                          "build yet")
    generator = Generator.from_config(student_guidance(teacher.trainable_network(recipe.generator), recipe.objective),
                                      recipe.generator)
    on_teacher = obj_cls.discriminator_on == "teacher"
    fake = (teacher.trainable_network(recipe.generator, seed=1)
            if "fake_score" in needs or ("discriminator" in needs and not on_teacher) else None)
    disc = None
    if "discriminator" in needs:
        try:
            disc = TeacherFeatureDiscriminator(teacher.feature_network()) if on_teacher else build_discriminator(fake)
        except ValueError as e:
            raise RecipeError(f"objective {recipe.objective.name} (as configured) needs a discriminator: {e}") from None
    data = real_data(recipe, teacher, f"objective {recipe.objective.name} (as configured)") if "data" in needs \
        else None
    nets = Nets(teacher=teacher.score, generator=generator, fake_score=fake, discriminator=disc)
    return Built(teacher, nets, obj_cls(recipe.objective, nets, teacher.shape), data, classes)


def check_fsdp(recipe: Recipe) -> None:
    """train.fsdp against the combinations it does not support; a RecipeError naming the fix."""
    if not recipe.train.fsdp:
        return
    if recipe.generator.lora_rank:
        raise RecipeError(f"train.fsdp shards fully fine-tuned networks, but generator.lora_rank="
                          f"{recipe.generator.lora_rank}: a LoRA generator and fake score share the teacher's frozen "
                          "base, which sharding each network would copy. Set train.fsdp=false (a LoRA run's trained "
                          "state is small; train.teacher_dtype=bf16 and train.gradient_checkpointing save memory)")
    if recipe.train.compile:
        raise RecipeError("train.fsdp together with train.compile is not supported: set one of them to false")


def check_eval(recipe: Recipe, teacher: Teacher) -> None:
    """eval.n and eval.curve_n against the fewest samples the teacher's domain metric takes, before any training (the
    Fashion FD's covariance of the classifier's features needs more samples than features)."""
    from ..eval.harness import domain_metric

    e, metric = recipe.eval, domain_metric(teacher)
    if metric is None:
        return
    for key, n, used in (("eval.n", e.n, e.at_end and "domain" in e.metrics), ("eval.curve_n", e.curve_n,
                                                                                e.curve_every > 0)):
        if used and n < metric.min_samples:
            raise RecipeError(f"{key}={n} is too few for {metric.what}: set {key} to more than "
                              f"{metric.min_samples - 1}")


def check_trackers(cfg) -> None:
    """train.log_with: trackers accelerate knows and this environment has, before any training."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in cfg.log_with:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise RecipeError(f"train.log_with: unknown tracker {name!r}; accelerate knows "
                              f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in available:
            raise RecipeError(f"train.log_with: {name} is not installed here (pip install {name}), or leave it out "
                              f"(available: {', '.join(sorted(available)) or 'none'})")


def resolve_eval(recipe: Recipe, teacher: Teacher) -> tuple[Recipe, str | None]:
    """The recipe with the evaluation this teacher can run, and a note to print once at the start when that is not
    what the recipe says; a RecipeError now (not after training) for an evaluation that cannot run. A teacher without
    a built-in metric (`sd`, `diffusers`: domain "none") turns eval.metrics' `domain` into Inception FID against
    eval.reference when one is given and CLIP score when eval.clip names a CLIP model (text-to-image teachers), else
    into no final evaluation."""
    from ..eval.harness import check_image_metrics

    e = recipe.eval
    if not e.at_end:
        return recipe, None
    if teacher.domain == "none" and "domain" in e.metrics:
        metrics = [m for m in e.metrics if m != "domain"] or (
            (["fid"] if e.reference is not None else [])
            + (["clip"] if e.clip is not None and hasattr(teacher, "eval_prompt_list") else []))
        recipe = dataclasses.replace(recipe, eval=dataclasses.replace(e, metrics=metrics, at_end=bool(metrics)))
        if metrics:
            check_image_metrics(recipe.eval, teacher, recipe.teacher.name)
            return recipe, (f"teacher {recipe.teacher.name!r} has no built-in metric: the final evaluation scores "
                            + ", ".join(f"{m} (against eval.reference {e.reference})" if m in ("fid", "kid")
                                        else f"{m} (with eval.clip {e.clip})" for m in metrics))
        return recipe, (f"teacher {recipe.teacher.name!r} has no built-in metric and neither eval.reference nor "
                        "eval.clip is set: no final evaluation (set eval.metrics=[fid] eval.reference=<stats .npz or "
                        "image folder>, or eval.clip=<CLIP model folder> for a text-to-image teacher, to score at the "
                        "end, or score the run later with `stepdistill eval --run`)")
    check_image_metrics(e, teacher, recipe.teacher.name)
    return recipe, None


def check_generator(recipe: Recipe, teacher: Teacher) -> None:
    """generator.students against the teacher; a RecipeError naming the fix."""
    g = recipe.generator  # (its ranges and width / tsm_iterations / lora_rank rules are checked by recipe.check_ranges)
    if g.students > 1 and teacher.num_classes is None:
        fix = " or teacher.conditional=true" if recipe.teacher.name == "gmm" else ""
        raise RecipeError(f"generator.students={g.students} splits the classes among students (MSD), but teacher "
                          f"{recipe.teacher.name!r} is unconditional: set generator.students=1{fix}")
    if teacher.num_classes is not None and g.students > teacher.num_classes:
        raise RecipeError(f"generator.students={g.students} is larger than the number of conditions "
                          f"({teacher.num_classes} classes), so some student would have no class: set "
                          f"generator.students to at most {teacher.num_classes}")


def real_data(recipe: Recipe, teacher: Teacher, purpose: str):
    """Real samples (`sample(n, cond)`) from data.path or the teacher's own data; `purpose` names who needs them."""
    from ..data.real import load_npz

    if recipe.data.path:
        return load_npz(recipe.data.path, teacher.shape, teacher.num_classes is not None)
    try:
        data = teacher.real_data()
    except FileNotFoundError as e:
        raise RecipeError(f"{purpose} needs real data: {e}") from None
    if data is None:
        raise RecipeError(f"{purpose} needs real data and teacher {recipe.teacher.name} has none built in: set "
                          f"data.path to an .npz with x (N, {', '.join(map(str, teacher.shape))}) in the teacher's "
                          "space" + (" and labels (N,)" if teacher.num_classes is not None else ""))
    return data


def check_batch(cfg) -> None:
    """train.batch_size against the processes and train.grad_accum: equal micro-batch rows on every process."""
    parallel.local_batch(cfg.batch_size)  # a batch that does not split is an error before building
    k = cfg.grad_accum
    if cfg.batch_size % (k * parallel.world()):  # (k >= 1 is checked with the recipe: recipe.check_ranges)
        raise RecipeError(f"train.grad_accum={k} must be >= 1 and split train.batch_size={cfg.batch_size} "
                          f"into micro-batches of equal rows on each of the {parallel.world()} processes: "
                          f"train.batch_size must be a multiple of {k} x {parallel.world()}")
