"""LoRA students that share the teacher's frozen weights, and their state dicts in the diffusers and kohya layouts.

`with_lora(teacher_score)` gives a ScoreModel whose network is a structural copy of the teacher's whose parameters
*are* the teacher's (copy.deepcopy with every tensor pre-entered in the memo: modules are copied, weights are not),
with a fresh peft adapter injected. Generator and fake score each get one, so a distillation holds one set of base
weights instead of three, the teacher is exactly "the base with adapters off", and nothing needs adapter switching.
Checkpoints of such networks hold only the adapter (`saved_state` / `load_saved_state`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import InputError, RecipeError
from ..recipe import DEFAULT_LORA_TARGETS
from .score import ScoreModel, is_lora  # noqa: F401  (is_lora re-exported: `from stepdistill.models.lora import ...`)


def _targets(net: nn.Module, targets: list[str]) -> dict[str, nn.Module]:
    """The modules a peft `target_modules` list selects (a name matches when it equals or ends with `.target`)."""
    return {name: m for name, m in net.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)}


def with_lora(score: ScoreModel, rank: int, alpha: float | None = None,
              targets: list[str] | tuple[str, ...] = DEFAULT_LORA_TARGETS, seed: int = 0) -> ScoreModel:
    """A trainable LoRA (rank, alpha; alpha defaults to rank, scale 1) on `score`'s frozen network, sharing its
    weights. Adapters start at zero (lora_B = 0), so the result predicts exactly what `score` does."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise RecipeError(f"generator.lora_rank must be >= 1, got {rank}")
    net, targets = score.net, list(targets)
    found = _targets(net, targets)
    if not found:
        raise RecipeError(f"generator.lora_targets {targets} match no module of {type(net).__name__}; name layers as "
                          "in its named_modules(), e.g. to_q, to_k, to_v, to_out.0 for diffusers attention")
    for name, m in found.items():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise RecipeError(f"generator.lora_targets selects {name} ({type(m).__name__}); LoRA adapts Linear and "
                              "Conv2d layers only")
        dims = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
        if rank > min(dims):
            raise RecipeError(f"generator.lora_rank={rank} is larger than layer {name} ({dims[0]} -> {dims[1]}): a "
                              f"rank above {min(dims)} adds nothing; use a rank <= {min(dims)}")
    net.requires_grad_(False)
    shared = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    copied = copy.deepcopy(net, shared)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # the adapters' random init must not shift the run's random stream
        torch.manual_seed(seed)
        inject_adapter_in_model(config, copied, adapter_name="default")
    return score.like(copied).train()


def saved_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a trained network: everything, or for a LoRA network only its adapter (the base
    is the teacher's)."""
    state = module.state_dict()
    return {k: v for k, v in state.items() if "lora_" in k} if is_lora(module) else state


def load_saved_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_lora(module):
        module.load_state_dict(state)
        return
    hint = "was it trained with other generator.lora_rank / lora_targets, or on another base?"
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        raise InputError(f"LoRA checkpoint does not fit this network ({hint}): {str(e).splitlines()[-1].strip()}") \
            from None
    missing = [k for k in missing if "lora_" in k]
    if missing or unexpected:
        raise InputError(f"LoRA checkpoint does not fit this network ({hint}): missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")


def merged(net: nn.Module) -> nn.Module:
    """The network with its adapters fused into the weights and the LoRA layers removed: a plain copy with the
    original module names (the teacher's weights are not touched; a network without adapters is returned as is)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not is_lora(net):
        return net
    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, attr, module.get_base_layer())
    net.__dict__.pop("peft_config", None)  # set by the injection; the merged network has no adapters
    return net
