"""How a run's networks execute, never what they compute: attention kernel, torch.compile, gradient checkpointing and
the frozen teacher's dtype (recipe keys train.attention, train.compile, train.gradient_checkpointing,
train.teacher_dtype). Every choice gives the same outputs within bf16 tolerance (tests/kernels).

kernels.jvp_attention (imported on its own: it needs diffusers, and Triton to run) is the Triton kernel for attention's
forward-mode tangent that sCM's `objective.jvp=flash` uses; kernels.forward_ad the workarounds forward-mode AD needs
through diffusers networks (sCM's JVP, and bench --speed's replay of it)."""
from .attention import ATTENTION, diffusers_models, set_attention, without_xformers, xformers_status
from .execution import configure_networks

__all__ = ["ATTENTION", "configure_networks", "diffusers_models", "set_attention", "without_xformers",
           "xformers_status"]
