"""Apply a recipe's execution choices (train.attention, train.compile, train.gradient_checkpointing,
train.teacher_dtype) to the networks of a run."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .attention import diffusers_models, set_attention


def _roles(nets) -> dict[str, nn.Module]:
    """The networks with passes worth configuring, by role (discriminator heads are small: left as they are)."""
    return {role: net for role, net in (("teacher", nets.teacher), ("generator", nets.generator.net),
                                        ("fake_score", nets.fake_score)) if net is not None}


def backbone(module: nn.Module) -> nn.Module:
    """The network inside a ScoreModel (the module itself otherwise)."""
    from ..models.score import ScoreModel

    return module.net if isinstance(module, ScoreModel) else module


def _shares_weights(a: nn.Module, b: nn.Module) -> bool:
    ids = {id(p) for p in a.parameters()}
    return any(id(p) in ids for p in b.parameters())


def enable_gradient_checkpointing(module: nn.Module, role: str) -> None:
    """Recompute the activations of `module`'s diffusers models in the backward pass (less memory, one more forward).
    A network without support is an error naming it."""
    from ..errors import RecipeError

    models = diffusers_models(module)
    unsupported = [type(m).__name__ for m in models if not getattr(m, "_supports_gradient_checkpointing", False)]
    inner = backbone(module)
    if not models or unsupported:
        name = ", ".join(unsupported) or type(inner).__name__
        raise RecipeError(f"train.gradient_checkpointing=true: the {role} network ({name}) does not support gradient "
                          "checkpointing (diffusers UNets and transformers do); set train.gradient_checkpointing=false"
                          + (" (an MLP this small needs none)" if not models else ""))
    for m in models:
        m.enable_gradient_checkpointing(checkpointed_call)


def checkpointed_call(block: nn.Module, *args):
    """torch.utils.checkpoint of one block, recomputed with its parameters' requires_grad as they were in the forward.

    Objectives run networks under `frozen()` (gradients into the input, none into the weights) and restore
    requires_grad afterwards, before backward: the recomputation would otherwise build a different graph than the
    forward did and torch.utils.checkpoint refuses it."""
    flags = [(p, p.requires_grad) for p in block.parameters()]

    @contextmanager
    def as_in_forward():
        now = [p.requires_grad for p, _ in flags]
        for p, flag in flags:
            p.requires_grad_(flag)
        try:
            yield
        finally:
            for (p, _), flag in zip(flags, now):
                p.requires_grad_(flag)

    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), as_in_forward()))


def configure_networks(nets, cfg, also: tuple[nn.Module, ...] = ()) -> dict[str, dict[str, str]]:
    """Set attention (every network, and the modules in `also`, e.g. the EMA copy), gradient checkpointing (networks
    with a backward pass: all three, since SiD backpropagates through the frozen teacher into its input), the teacher's
    weight dtype, and torch.compile (each network's inner backbone, in place: state dict keys do not change). Returns
    what each role got, for logs and reports.

    Call it after any deep copy of a network (the EMA): a compiled module's copy would still run the original."""
    from ..errors import RecipeError

    roles = _roles(nets)
    report: dict[str, dict[str, str]] = {}
    for role, net in roles.items():
        report[role] = {"attention": set_attention(net, cfg.attention, role)}
    for m in also:
        set_attention(m, cfg.attention, "EMA generator")
    if cfg.gradient_checkpointing:
        for role, net in roles.items():
            enable_gradient_checkpointing(net, role)
            report[role]["gradient_checkpointing"] = "on"
    if cfg.teacher_dtype == "bf16" and next(nets.teacher.parameters(), None) is None:
        report["teacher"]["dtype"] = "n/a"  # an analytic teacher (gmm) has no weights to store in bf16
    elif cfg.teacher_dtype == "bf16":
        shared = [r for r in ("generator", "fake_score") if r in roles and _shares_weights(roles[r], nets.teacher)]
        if shared and cfg.precision != "bf16":
            raise RecipeError(f"train.teacher_dtype=bf16 also stores the {' and '.join(shared)}'s frozen base weights "
                              "in bf16 (LoRA adapters share the teacher's weights), which needs bf16 autocast: set "
                              "train.precision=bf16 as well, or train.teacher_dtype=fp32")
        # The frozen teacher only ever runs forward (and, for SiD, backward into its input): bf16 halves its memory and
        # bandwidth; ScoreModel casts inputs to the network's dtype and predictions back to float32.
        nets.teacher.to(torch.bfloat16)
        report["teacher"]["dtype"] = "bf16"
    if cfg.compile:
        for role, net in roles.items():
            backbone(net).compile()  # nn.Module.compile, in place: checkpoints and LoRA state keep their keys
            report[role]["compile"] = "on"
    return report
