"""The Triton kernel behind kernels/jvp_attention.py (the maths is in that module's docstring).

Imported only when the kernel can run (a CUDA device, or Triton's interpreter), since it needs `triton`. Whether
`triton.jit` compiles or interprets is decided process-wide by TRITON_INTERPRET when triton is first imported (its
own library functions, tl.sum and tl.max among them, are wrapped then).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x log2 e); a compiled kernel reads only constexpr globals


@triton.jit
def attention_fwd(Q, K, V, DQ, DK, DV, Out, DOut, LSE,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                   H, NQ, NK, D, scale,
                   TANGENT: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DK: tl.constexpr, HAS_DV: tl.constexpr,
                   PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, head), streaming all NK keys in tiles of BLOCK_N.

    Strides are given for dims (b, h, n), the last one is 1: Q and DQ share theirs, K and DK theirs, V and DV theirs,
    Out (O) and DOut (dO) theirs; LSE is a contiguous [B, H, NQ] float32 tensor. Rows beyond NQ, keys beyond NK and
    head-dim lanes beyond D are masked (zeros in, nothing out).

    UPCAST (set for bfloat16 under Triton's interpreter, whose tl.dot mishandles bfloat16 operands): operands are
    widened to float32 after loading, and P is rounded to bfloat16 and widened back, so the products are the ones a
    GPU's bfloat16 dot computes (bfloat16 x bfloat16 is exact in float32), up to the order of the float32 sums."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q_off = b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :]
    q_mask = (rows[:, None] < NQ) & (dims[None, :] < D)
    o_off = b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if TANGENT and HAS_DQ:
        dq = tl.load(DQ + q_off, mask=q_mask, other=0.0)
        if UPCAST:
            dq = dq.to(tl.float32)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S (in log2 units: S log2 e)
    l_sum = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(S - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum exp(S - m) v
    if TANGENT:
        r = tl.zeros([BLOCK_M], tl.float32)  # sum exp(S - m) dS
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # sum exp(S - m) (dS v + dv)
    for start in range(0, NK, BLOCK_N):
        cols = start + cols0
        kv_mask = (cols[:, None] < NK) & (dims[None, :] < D)
        k = tl.load(K + k_base + cols[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + v_base + cols[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * LOG2E)
        s = tl.where(cols[None, :] < NK, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds at least one real key
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old max (0 on the first tile)
        p = tl.exp2(s - m_new[:, None])  # 0 on masked keys
        l_sum = l_sum * alpha + tl.sum(p, 1)
        p_in = p.to(V.dtype.element_ty)  # P in the inputs' dtype for the P v product (flash attention's rounding)
        if UPCAST:
            p_in = p_in.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=PRECISION)
        if TANGENT:
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_DQ:
                ds += tl.dot(dq, tl.trans(k), input_precision=PRECISION)
            if HAS_DK:
                dk = tl.load(DK + k_base + cols[:, None] * stride_kn + dims[None, :], mask=kv_mask, other=0.0)
                if UPCAST:
                    dk = dk.to(tl.float32)
                ds += tl.dot(q, tl.trans(dk), input_precision=PRECISION)
            pds = p * (ds * scale)
            r = r * alpha + tl.sum(pds, 1)
            pds_in = pds.to(V.dtype.element_ty)
            if UPCAST:
                pds_in = pds_in.to(tl.float32)
            acc_t = acc_t * alpha[:, None] + tl.dot(pds_in, v, input_precision=PRECISION)
            if HAS_DV:
                dv = tl.load(DV + v_base + cols[:, None] * stride_vn + dims[None, :], mask=kv_mask, other=0.0)
                if UPCAST:
                    dv = dv.to(tl.float32)
                acc_t += tl.dot(p_in, dv, input_precision=PRECISION)
        m = m_new

    o = acc / l_sum[:, None]
    tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(LSE + pid_bh * NQ + rows, (m + tl.log2(l_sum)) / LOG2E, mask=rows < NQ)  # natural-log logsumexp of S
    if TANGENT:
        do = acc_t / l_sum[:, None] - (r / l_sum)[:, None] * o
        tl.store(DOut + o_off, do.to(DOut.dtype.element_ty), mask=q_mask)

