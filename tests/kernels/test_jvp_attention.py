"""The Triton attention-JVP kernel (kernels/jvp_attention.py), run by Triton's interpreter on the CPU: O and dO match
torch.func.jvp of math attention per dtype, over ragged and cross-attention shapes; its backward matches autograd;
inside a diffusers UNet and through sCM's JVP pass (objective.jvp=flash) it gives the math path's tangent.

tests/conftest.py switches the interpreter on where there is no CUDA device (TRITON_INTERPRET=1 must come before
triton's first import); it runs every program of the grid in NumPy, so shapes are small: 1 to 70 tokens, lengths off
the tile sizes, tiles of 16 to cross several of them. With a GPU the same tests run the compiled kernel on it."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from stepdistill.kernels import jvp_attention as J

pytest.importorskip("triton", reason="the attention JVP kernel needs Triton (it comes with CUDA builds of torch)")
DEVICE = "cpu" if J.interpreting() else "cuda"
pytestmark = pytest.mark.skipif(J.kernel_status(DEVICE) is not None, reason=str(J.kernel_status(DEVICE)))

@pytest.fixture(autouse=True)
def _one_thread():
    """The interpreter is single-threaded; the networks around it run 3-4x faster on one thread than on conftest's two
    when the machine's two cores are busy."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(2)


# max |error| allowed, relative to the largest |reference|: float32 is exact up to summation order; half precisions
# round P and P*dS to 8 (bf16) / 11 (fp16) bits before their products with V, as flash attention does
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def math_attention(q, k, v, scale=None):
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def tensors(nq, nk, d, dtype, batch=1, heads=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, dq = (torch.randn(batch, heads, nq, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    k, v, dk, dv = (torch.randn(batch, heads, nk, d, generator=g).to(DEVICE, dtype) for _ in range(4))
    return q, k, v, dq, dk, dv


def assert_near(got, want, dtype, what):
    err = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= TOL[dtype] * max(scale, 1.0), f"{what}: max error {err:.3g} (reference up to {scale:.3g})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("nq, nk, d, block", [
    (37, 53, 32, (16, 16)),  # self-attention-like, both lengths off the tile, four key tiles
    (70, 7, 64, (16, 16)),  # cross-attention: 70 image tokens on 7 text tokens
    (1, 70, 40, (16, 32)),  # one query; head dim 40 (SD1.5's) padded to 64 and masked
    (20, 20, 64, (0, 0)),  # the default tiles (64 x 64): one partial tile each way
])
def test_output_and_tangent_match_jvp_of_math_attention(dtype, nq, nk, d, block):
    q, k, v, dq, dk, dv = tensors(nq, nk, d, dtype)
    o, do = J.attention_jvp(q, k, v, dq, dk, dv, block=block)
    assert o.dtype == do.dtype == dtype and o.shape == do.shape == q.shape
    want_o, want_do = torch.func.jvp(math_attention, (q.float(), k.float(), v.float()),  # the rounded inputs, exactly
                                     (dq.float(), dk.float(), dv.float()))
    assert_near(o, want_o, dtype, "O")
    assert_near(do, want_do, dtype, "dO")


def test_head_dim_128_scale_and_missing_tangents():
    q, k, v, dq, dk, dv = tensors(9, 33, 128, torch.float32)
    o, do = J.attention_jvp(q, k, v, dq=dq, dv=dv, scale=0.3, block=(16, 16))  # keys without a tangent: text tokens
    want_o, want_do = torch.func.jvp(lambda q_, v_: math_attention(q_, k, v_, 0.3), (q, v), (dq, dv))
    assert_near(o, want_o, torch.float32, "O")
    assert_near(do, want_do, torch.float32, "dO")


def test_strided_inputs_and_tangents_with_other_strides():
    """diffusers' AttnProcessor2_0 hands SDPA transposed views ([B, N, H, D] memory); forward-mode tangents may come
    with other strides than their primals; broadcast keys and a head dim that is not the innermost in memory."""
    q, k, v, dq, dk, dv = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors(21, 18, 32, torch.float32))
    dq = dq.contiguous()
    assert not q.is_contiguous() and dq.stride() != q.stride()
    o, do = J.attention_jvp(q, k, v, dq, dk, dv, block=(16, 16))
    want_o, want_do = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    assert_near(o, want_o, torch.float32, "O")
    assert_near(do, want_do, torch.float32, "dO")
    k, v = k[:, :1].expand_as(k), v[:, :1].expand_as(v)  # one head's keys broadcast (stride 0), queries transposed
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # a unit stride that is not the last one
    o, do = J.attention_jvp(q, k, v, dq, dk, dv, block=(16, 16))
    want_o, want_do = torch.func.jvp(math_attention, (q, k.contiguous(), v.contiguous()), (dq, dk, dv))
    assert_near(o, want_o, torch.float32, "O, broadcast keys")
    assert_near(do, want_do, torch.float32, "dO, broadcast keys")


def test_autograd_function_forward_mode_both_apis_and_backward():
    q, k, v, dq, dk, dv = tensors(25, 19, 32, torch.float32, batch=2, heads=1)
    want_o, want_do = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    o, do = torch.func.jvp(lambda *a: J.attention(*a, block=(16, 16)), (q, k, v), (dq, dk, dv))
    assert_near(o, want_o, torch.float32, "torch.func.jvp O")
    assert_near(do, want_do, torch.float32, "torch.func.jvp dO")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = J.attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv), block=(16, 16))
        assert_near(fwAD.unpack_dual(out).tangent, want_do, torch.float32, "forward_ad dO")
    # reverse mode (a training pass through the kernel): the chunked PyTorch backward, chunks smaller than the queries
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    old, J.BACKWARD_CHUNK = J.BACKWARD_CHUNK, 8
    try:
        got = torch.autograd.grad((J.attention(*inputs, block=(16, 16)) * grad).sum(), inputs)
    finally:
        J.BACKWARD_CHUNK = old
    want = torch.autograd.grad((math_attention(*inputs) * grad).sum(), inputs)
    for name, a, b in zip("qkv", got, want):
        assert_near(a, b, torch.float32, f"d loss / d{name}")


def test_sdpa_calls_the_kernel_takes_and_those_it_leaves():
    q, k, v, dq, dk, dv = tensors(17, 17, 32, torch.float32)
    want = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))  # (SDPA's fused kernels have no forward mode)
    with J.sdpa_to_kernel() as calls:
        got = torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (dq, dk, dv))
        mask = torch.ones(17, 17, dtype=torch.bool, device=q.device).tril()
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # masks stay with PyTorch
    assert calls == {"kernel": 1, "sdpa": 1}
    torch.testing.assert_close(masked, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    for a, b in zip(got, want):
        assert_near(a, b, torch.float32, "SDPA routed")


def test_kernel_status_names_why_it_cannot_run(monkeypatch):
    assert J.kernel_status(DEVICE) is None
    monkeypatch.setattr(J, "interpreting", lambda: False)  # triton imported without TRITON_INTERPRET
    assert "needs a CUDA device" in J.kernel_status("cpu")
    assert not J.kernel_takes(*(t.cpu() for t in tensors(4, 4, 32, torch.float32)[:3]))


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=1, norm_num_groups=8)  # one head of 32 channels


def spy_on_launches(monkeypatch) -> list[bool]:
    """Record each kernel launch: whether it computed a tangent."""
    launches, launch = [], J._launch
    monkeypatch.setattr(J, "_launch", lambda *a: launches.append(a[7]) or launch(*a))  # a[7]: `tangent`
    return launches


def test_a_unet_with_the_processor_gives_the_math_paths_jvp_and_gradients(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from stepdistill.kernels.forward_ad import forward_ad_ready

    unet = tiny_unet().to(DEVICE)
    g = torch.Generator().manual_seed(1)
    x, dx = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE), torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    t, c = torch.tensor([10.0, 700.0], device=DEVICE), torch.randn(2, 7, 32, generator=g).to(DEVICE)
    with torch.no_grad(), forward_ad_ready(unet):
        want = torch.func.jvp(lambda x_: unet(x_, t, encoder_hidden_states=c).sample, (x,), (dx,))
    unet.set_attn_processor(J.JVPAttnProcessor())
    launches = spy_on_launches(monkeypatch)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # group norm's strided tangents: as forward_ad_ready does
        hooks = [m.register_forward_pre_hook(lambda _, a: (a[0].contiguous(), *a[1:]))
                 for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
        got = torch.func.jvp(lambda x_: unet(x_, t, encoder_hidden_states=c).sample, (x,), (dx,))
        for h in hooks:
            h.remove()
    layers = len(unet.attn_processors)  # self- and cross-attention of each transformer block
    assert launches.count(True) == layers and launches.count(False) == layers
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # a training pass through the processor: gradients as with SDPA
    grads = {}
    for name, processor in (("kernel", J.JVPAttnProcessor()), ("sdpa", AttnProcessor2_0())):
        unet.set_attn_processor(processor)
        unet.zero_grad()
        unet(x, t, encoder_hidden_states=c).sample.square().mean().backward()
        grads[name] = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["kernel"], grads["sdpa"], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    import numpy as np

    path = tmp_path_factory.mktemp("data") / "latents.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((8, 4, 8, 8)).astype(np.float32))
    return path


def scm_on_fashion_t2i(latents, jvp: str, *overrides: str):
    from stepdistill.recipe import load_recipe
    from stepdistill.training.trainer import build

    return build(load_recipe(None, ["train.batch_size=2", f"data.path={latents}", f"objective.jvp={jvp}", *overrides],
                             data={"teacher": {"name": "fashion-t2i"}, "objective": {"name": "scm"}}))


@pytest.mark.skipif(DEVICE != "cpu", reason="the recipe's networks are built on the CPU")
def test_scm_jvp_flash_through_a_text_to_image_unet_matches_the_math_path(latents, monkeypatch):
    """The bundled Fashion-MNIST text-to-image UNet (self- and cross-attention over 77 text tokens): sCM's tangent
    with objective.jvp=flash is the one forward-mode AD gives through SDPA's math backend, and a loss from it too."""
    b = scm_on_fashion_t2i(latents, "flash", "objective.tangent_warmup=0")
    obj = b.objective
    torch.manual_seed(0)
    x, theta, dxdt, cond = obj.training_points(b.batch(2))
    cos, sin = theta.cos()[:, None, None, None], theta.sin()[:, None, None, None]
    args = (x, theta, cond, cos * sin * dxdt, theta.cos() * theta.sin())
    launches = spy_on_launches(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        f_flash, df_flash = obj.velocity_and_tangent(*args)
    monkeypatch.undo()
    assert obj.jvp_mode == "flash" and launches.count(True) == launches.count(False) > 0  # every attention of the
    #                                        JVP ran the kernel: a primal launch (the forward), then one with tangents
    obj.jvp_mode = "forward"
    f_math, df_math = obj.velocity_and_tangent(*args)
    torch.testing.assert_close(f_flash, f_math, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(df_flash, df_math, rtol=1e-4, atol=1e-4)
    assert df_math.abs().max() > 0.1
    losses = {}
    for mode in ("flash", "forward"):
        obj.jvp_mode = mode
        torch.manual_seed(3)
        losses[mode] = obj.phases(0)[0].loss(b.batch(2), None).loss.item()
    assert losses["flash"] == pytest.approx(losses["forward"], rel=1e-4)


def test_scm_jvp_flash_without_a_kernel_warns_and_uses_the_math_path(latents, monkeypatch):
    monkeypatch.setattr(J, "interpreting", lambda: False)  # a CPU without the interpreter
    b = scm_on_fashion_t2i(latents, "flash")
    x = torch.randn(2, 4, 8, 8)
    cond = b.batch(2).cond
    with pytest.warns(UserWarning, match="objective.jvp=flash: the Triton kernel needs a CUDA device.*math backend"):
        b.objective.velocity_and_tangent(x, torch.tensor([0.3, 1.2]), cond, torch.randn_like(x), torch.rand(2))
    assert b.objective.jvp_mode == "forward"


@pytest.mark.skipif(DEVICE != "cpu", reason="the script's GPU run is scripts/device_check.sh jvp")
def test_timing_script_at_tiny_size_appends_rows_with_the_kernels_error(tmp_path):
    """scripts/jvp_attention_check.py, the device check's timing part, on tiny shapes: the code a GPU runs."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("jvp_attention_check", Path("scripts/jvp_attention_check.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = tmp_path / "gpu.md"
    assert script.main(["--tiny", "--dtypes", "fp32", "--steps", "1", "--warmup", "0", "--report", str(report)]) == 0
    rows = [line.split("|") for line in report.read_text().splitlines() if line.startswith(("| attention", "| unet"))]
    assert [(r[2].strip(), r[5].strip()) for r in rows] == [
        ("tiny self", "kernel"), ("tiny self", "math"), ("tiny cross", "kernel"), ("tiny cross", "math"),
        ("tiny UNet JVP", "kernel"), ("tiny UNet JVP", "math")]
    assert all(float(r[7]) > 0 for r in rows)  # tokens/s
    assert all(float(r[9]) < 1e-4 for r in rows if r[5].strip() == "kernel")  # dO error against the math path
