r"""Attention with a forward-mode tangent in one pass: a flash-style Triton kernel for sCM / TBCM / SANA-Sprint's JVP.

PyTorch's fused attention kernels have no forward-mode AD rule, so `torch.func.jvp` through a network had to run SDPA's
math backend, which materialises the [queries x keys] score matrix (and its tangent): memory quadratic in the
sequence length. This kernel computes the output O and its tangent dO together, streaming keys in tiles with an
online softmax, in O(N) memory.

The maths. For one (batch, head), with queries q_i, keys k_j, values v_j and their tangents dq, dk, dv:

    S_ij = s q_i.k_j                      (s = scale, 1/sqrt(head dim) by default)
    dS_ij = s (dq_i.k_j + q_i.dk_j)
    P_ij = exp(S_ij) / sum_j' exp(S_ij')  O_i = sum_j P_ij v_j
    dP_ij = P_ij (dS_ij - r_i),           r_i = sum_j P_ij dS_ij          (the softmax's JVP)
    dO_i = sum_j dP_ij v_j + P_ij dv_j = sum_j P_ij (dS_ij v_j + dv_j) - r_i O_i.

Every term is a P-weighted sum over keys, which is what lets the tangent ride along flash attention's online softmax.
Walking the keys in tiles, each query row keeps its running max m, and, with p_ij = exp(S_ij - m):

    l = sum_j p_ij,   acc_O = sum_j p_ij v_j,   r~ = sum_j p_ij dS_ij,   acc_dO = sum_j p_ij (dS_ij v_j + dv_j).

When a tile raises the max to m', all four are multiplied by exp(m - m') before the tile's terms are added (the
common factor exp(-m) of every p changes). After the last tile: O = acc_O / l, r = r~ / l and

    dO = acc_dO / l - r O.

The kernel also writes the row logsumexp m + log l (not used yet; a Triton backward would start from it). Products
run in the inputs' dtype (float32, bfloat16, float16) and accumulate in float32; float32 inputs use IEEE float32
products (or TF32 where torch.backends.cuda.matmul.allow_tf32 allows it). Head dims up to 256 (padded to a power of
two >= 16, masked), any query and key lengths (masked edge tiles), self- and cross-attention; no attention mask,
dropout or causal masking: calls with those stay on PyTorch's path.

Autograd. `attention(q, k, v)` is a torch.autograd.Function: its forward runs the kernel for O alone, its `jvp` rule
(forward-mode AD: torch.func.jvp, torch.autograd.forward_ad) runs the kernel once more with the tangents and returns
dO, and its backward (reverse mode, for a training pass) is plain PyTorch: the math attention's gradient recomputed in
chunks of queries from q, k and v, so its memory is one chunk's [chunk x keys] scores, not the full matrix. (A Triton
backward would be faster; the JVP pass runs without gradients, and training passes are better served by SDPA's flash
kernel, which is what the rest of a run uses.) `attention_jvp(q, k, v, dq, dk, dv)` is the one-pass kernel itself.

Where it runs: on CUDA tensors with Triton, or under Triton's interpreter (any device: CPU tests; TRITON_INTERPRET=1
must be set before triton is first imported, which tests/conftest.py does on machines without CUDA);
`kernel_status(device)` says why not otherwise. `sdpa_to_kernel()` routes every
`F.scaled_dot_product_attention` call it can take to `attention` for its duration (diffusers' UNet processors and the
transformers' own processors all call SDPA), which is how sCM's `objective.jvp=flash` uses it; `JVPAttnProcessor` is
diffusers' AttnProcessor2_0 under that routing, for setting on a model by hand.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.overrides import TorchFunctionMode

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
BACKWARD_CHUNK = 1024  # query rows per chunk of the PyTorch backward


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: TRITON_INTERPRET=1 was set when triton was first imported (the
    mode is fixed then, process-wide). Call only with triton importable."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def kernel_status(device: torch.device | str | None = None) -> str | None:
    """None when the kernel can run on `device` (default: CUDA), else the reason it cannot (a sentence)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    device = torch.device(device if device is not None else "cuda")
    if interpreting():
        return None
    if device.type != "cuda":
        late = " (it was set after triton's import)" if os.environ.get("TRITON_INTERPRET") == "1" else ""
        return (f"the Triton kernel needs a CUDA device, and this network is on {device} (TRITON_INTERPRET=1 before "
                f"triton is first imported runs it in Triton's interpreter, slowly, for tests{late})")
    if not torch.cuda.is_available():
        return "the Triton kernel needs a CUDA device, and none is available"
    return None


def _blocks(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for a head dim: two float32 [BLOCK_M x BLOCK_D] accumulators must fit
    in registers. Chosen by the usual flash-attention sizes, not tuned on a GPU yet."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())  # the next power of two
    if block_d <= 64:
        return 64, 64, block_d, 4
    if block_d <= 128:
        return 64, 32, block_d, 8
    return 32, 32, block_d, 8


def _pair(x: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A primal and its tangent (or None) as the kernel reads them: one set of strides for both, the last one 1
    (diffusers' transposed views pass as they are; tangents laid out otherwise than their primals are copied)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if t is None:
        return x, None
    t = t.to(x.dtype)
    return (x, t) if t.stride() == x.stride() else (x.contiguous(), t.contiguous())


def _launch(q, k, v, dq, dk, dv, scale, tangent, block_m, block_n):
    """Run the kernel on plain tensors: (O, dO, logsumexp), dO empty when `tangent` is false."""
    from ._jvp_triton import attention_fwd

    B, H, NQ, D = q.shape
    if not tangent:
        dq = dk = dv = None
    (q, dq), (k, dk), (v, dv) = _pair(q, dq), _pair(k, dk), _pair(v, dv)
    o = torch.empty_like(q)  # q's layout where it is dense (diffusers' [B, N, H, D] memory: its reshape is free)
    do = torch.empty_like(o) if tangent else o.new_empty(0)
    lse = torch.empty(B, H, NQ, device=q.device, dtype=torch.float32)
    bm, bn, block_d, warps = _blocks(D)
    block_m, block_n = block_m or bm, block_n or bn
    # float32 products in IEEE float32 unless torch allows TF32 (as its own matmuls do); half-precision products are
    # what they are, and get Triton's default setting (which only concerns float32 operands)
    ieee = q.dtype == torch.float32 and not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    precision = "ieee" if ieee else "tf32"
    attention_fwd[(-(-NQ // block_m), B * H)](
        q, k, v, q if dq is None else dq, k if dk is None else dk, v if dv is None else dv, o, do, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), H, NQ, k.shape[2], D, scale,
        TANGENT=tangent, HAS_DQ=dq is not None, HAS_DK=dk is not None, HAS_DV=dv is not None,
        PRECISION=precision, UPCAST=interpreting() and q.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return o, do, lse


# The kernel as PyTorch operators: torch.func's transforms hand autograd.Function rules their own tensor wrappers,
# which a Triton launch cannot read; an operator call unwraps them, as for any built-in operator.
@torch.library.custom_op("stepdistill::flash_attention", mutates_args=())
def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_m: int = 0,
                     block_n: int = 0) -> torch.Tensor:
    return _launch(q, k, v, None, None, None, scale, False, block_m, block_n)[0]


@_flash_attention.register_fake
def _(q, k, v, scale, block_m=0, block_n=0):
    return torch.empty_like(q)


@torch.library.custom_op("stepdistill::flash_attention_jvp", mutates_args=())
def _flash_attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor | None,
                         dk: torch.Tensor | None, dv: torch.Tensor | None, scale: float, block_m: int = 0,
                         block_n: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    o, do, _ = _launch(q, k, v, dq, dk, dv, scale, True, block_m, block_n)
    return o, do


@_flash_attention_jvp.register_fake
def _(q, k, v, dq, dk, dv, scale, block_m=0, block_n=0):
    return torch.empty_like(q), torch.empty_like(q)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [B, H, Nq, D], k and v [B, H, Nk, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.dtype not in DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one of {DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM or k.shape[2] == 0:
        raise ValueError(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM} or no keys")


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor | None = None,
                  dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, scale: float | None = None,
                  block: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, dO) of softmax(scale q k^T) v in one pass of the Triton kernel; a tangent given as None is zero.

    q: [batch, heads, queries, head dim]; k, v: [batch, heads, keys, head dim] (SDPA's layout, any strides with a
    unit last one); dq, dk, dv shaped as their primals. `block` = (BLOCK_M, BLOCK_N) overrides the tile sizes (tests
    use small ones to cross several tiles on short sequences; 0 keeps the default)."""
    _check(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _flash_attention_jvp(q, k, v, dq, dk, dv, scale, *block)


def _math_backward(q, k, v, grad, scale):
    """Gradients of softmax(scale q k^T) v for the output gradient `grad`, recomputed from q, k, v in float32, a
    chunk of query rows at a time (memory: one [chunk x keys] score block per batch and head)."""
    qf, kf, vf, gf = (t.float() for t in (q, k, v, grad))
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for i in range(0, q.shape[2], BACKWARD_CHUNK):
        rows = slice(i, i + BACKWARD_CHUNK)
        p = torch.softmax(scale * qf[:, :, rows] @ kf.transpose(-1, -2), dim=-1)
        g = gf[:, :, rows]
        dv += p.transpose(-1, -2) @ g
        dp = g @ vf.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
        dq[:, :, rows] = ds @ kf
        dk += ds.transpose(-1, -2) @ qf[:, :, rows]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Attention(torch.autograd.Function):
    """softmax(scale q k^T) v: the Triton kernel forward, its one-pass tangent as the forward-mode rule, and a chunked
    PyTorch backward."""

    @staticmethod
    def forward(q, k, v, scale, block_m, block_n):
        return _flash_attention(q, k, v, scale, block_m, block_n)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, ctx.scale, ctx.block_m, ctx.block_n = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        q, k, v = ctx.saved_tensors
        return _flash_attention_jvp(q, k, v, dq, dk, dv, ctx.scale, ctx.block_m, ctx.block_n)[1]

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        return (*_math_backward(q, k, v, grad, ctx.scale), None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              block: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """softmax(scale q k^T) v (SDPA's layout [batch, heads, tokens, head dim]) through the Triton kernel, with a
    forward-mode AD rule (the kernel's one-pass tangent) and a reverse-mode one (chunked PyTorch). `block` as in
    `attention_jvp`."""
    _check(q, k, v)
    return _Attention.apply(q, k, v, 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), *block)


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                 is_causal: bool = False, enable_gqa: bool = False) -> bool:
    """Whether an SDPA call with these arguments is one the kernel computes (else it stays on PyTorch's path)."""
    return (attn_mask is None and dropout_p == 0.0 and not is_causal and not enable_gqa and q.dim() == 4
            and k.shape == v.shape and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1] <= MAX_HEAD_DIM
            and k.shape[2] > 0 and q.dtype in DTYPES and q.dtype == k.dtype == v.dtype
            and kernel_status(q.device) is None)


class _SDPAToKernel(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = {"kernel": 0, "sdpa": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, dropout, causal, scale, gqa = _sdpa_arguments(*args, **kwargs)
            if kernel_takes(q, k, v, mask, dropout, causal, gqa):
                self.calls["kernel"] += 1
                return attention(q, k, v, scale)
            self.calls["sdpa"] += 1
        return func(*args, **kwargs)


@contextmanager
def sdpa_to_kernel() -> Iterator[dict[str, int]]:
    """Route `F.scaled_dot_product_attention` calls to the Triton kernel for the duration, where it can take them (no
    mask, dropout, causal masking or grouped heads; a dtype, head dim and device it supports); the others run as they
    would. Yields a dict counting the calls each way."""
    mode = _SDPAToKernel()
    with mode:
        yield mode.calls


class JVPAttnProcessor(AttnProcessor2_0):
    """diffusers' AttnProcessor2_0 with its SDPA call routed to the Triton kernel (`sdpa_to_kernel`): the same outputs,
    plus a forward-mode AD rule that needs no [tokens x tokens] matrix."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        with sdpa_to_kernel():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
