"""Triton kernel for batched tree attention (jit code only; checks and launch live in ops.py).

One program computes BLOCK_M of the T queries of one (row, head): first the row's cached
prefix ``[start, end)`` (ragged per row), then the TK tree keys that follow position S under
the bit-packed ancestor mask (the queries are the last T of those TK nodes), with an online
softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022).
Grouped-query attention: query head h reads KV head ``h // GROUP``.

Optional, each a constexpr switch (off: the code of plain tree attention): a sliding window
and chunks over position ids (a key stays visible when ``p_k > p_q - window`` and when
``p_k`` lies in the query's chunk; prefix blocks with nothing visible load no K/V), Gemma-2 logit
softcapping, gpt-oss attention sinks (the running max starts at the head's sink logit with
a normaliser of 1, so the sink joins the denominator and the max, and adds no value).
Head dims are padded to BLOCK_DK / BLOCK_DV (powers of two) with masked loads; the value
head dim may differ from the key's (multi-head latent attention).
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp alone (the interpreter has no libdevice): its Taylor series below 0.25, where
    ``1 - exp(-2|x|)`` would cancel (truncation error there < 1e-8 relative)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _visible(allowed, qpos, kpos, window, chunk, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr):
    """``allowed`` (BLOCK_M, BLOCK_N) less the keys outside the window / chunk (transformers' overlays, by position)."""
    if HAS_WINDOW:
        allowed = allowed & (kpos[None, :] > qpos[:, None] - window)
    if HAS_CHUNK:
        # floor(p_q / chunk) * chunk by a non-negative remainder, the same whether % truncates or floors
        first = qpos - ((qpos % chunk) + chunk) % chunk
        allowed = allowed & (kpos[None, :] >= first[:, None]) & (kpos[None, :] < first[:, None] + chunk)
    return allowed


@triton.jit
def _fold_block(q, k, v, allowed, m_i, l_i, acc, scale, softcap, IEEE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Fold one block of keys (k: BLOCK_DK x N, v: N x BLOCK_DV) into the running max m_i,
    normaliser l_i and output acc; ``allowed`` (BLOCK_M x N) masks the scores."""
    if IEEE:  # float32 products, no TF32 rounding
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * scale
    else:
        s = tl.dot(q, k) * scale
    if HAS_SOFTCAP:  # Gemma-2: after scaling, before masking
        s = softcap * _tanh(s / softcap)
    s = tl.where(allowed, s, float("-inf"))
    # rescale what was summed so far to the new running max (a row with nothing allowed yet keeps 0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _load_fold(q, k_base, v_base, idx, idx_ok, allowed, m_i, l_i, acc, stride_ks, stride_kd, stride_vs, stride_vd,
               scale, softcap, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr, IEEE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Load the keys/values at cache indices ``idx`` (BLOCK_N,) and fold them in."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_base + idx[None, :] * stride_ks + offs_dk[:, None] * stride_kd,
                mask=idx_ok[None, :] & (offs_dk < HEAD_DK)[:, None], other=0.0)
    v = tl.load(v_base + idx[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                mask=idx_ok[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0)
    return _fold_block(q, k, v, allowed, m_i, l_i, acc, scale, softcap, IEEE, HAS_SOFTCAP)


@triton.jit
def _tree_attention_fwd(
    Q, K, V, O, START, END, BITS, QPOS, KPOS, SINKS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_bb, stride_bt, stride_bw,
    stride_qpb, stride_qpt, stride_kpb, stride_kps,
    H, T, TK, S, scale, window, chunk, softcap,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    HAS_POS: tl.constexpr = HAS_WINDOW or HAS_CHUNK
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B * Hk * S * D can pass 2**31 at long prefixes
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < T

    # queries of this block, (BLOCK_M, BLOCK_DK), zero past the head dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_dk[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_dk < HEAD_DK)[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if HAS_SINKS:  # the sink is a logit seen first: running max = sink, normaliser = exp(0)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(SINKS + h).to(tl.float32)
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    start = tl.load(START + b)
    end = tl.load(END + b)
    if HAS_POS:
        kpos_base = KPOS + b * stride_kpb
        qpos = tl.load(QPOS + b * stride_qpb + offs_m * stride_qpt, mask=row_ok, other=0)

    # phase 1: the row's cached prefix [start, end), every query sees all of it (within its window/chunk)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        allowed = row_ok[:, None] & col_ok[None, :]
        if HAS_POS:
            kpos = tl.load(kpos_base + cols * stride_kps, mask=col_ok, other=0)
            allowed = _visible(allowed, qpos, kpos, window, chunk, HAS_WINDOW, HAS_CHUNK)
            if tl.max(allowed.to(tl.int32)) > 0:  # a block wholly outside the window loads no K/V
                m_i, l_i, acc = _load_fold(q, k_base, v_base, cols, col_ok, allowed, m_i, l_i, acc,
                                           stride_ks, stride_kd, stride_vs, stride_vd, scale, softcap,
                                           HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, IEEE, HAS_SOFTCAP)
        else:
            m_i, l_i, acc = _load_fold(q, k_base, v_base, cols, col_ok, allowed, m_i, l_i, acc,
                                       stride_ks, stride_kd, stride_vs, stride_vd, scale, softcap,
                                       HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, IEEE, HAS_SOFTCAP)

    # phase 2: the tree's keys at S + j (j < TK), allowed where bit j of the query's mask is set
    bits_base = BITS + b * stride_bb
    for n0 in range(0, TK, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < TK
        words = tl.load(bits_base + offs_m[:, None] * stride_bt + (cols // 32)[None, :] * stride_bw,
                        mask=row_ok[:, None] & col_ok[None, :], other=0)
        allowed = (((words >> (cols % 32)[None, :]) & 1) != 0) & col_ok[None, :]
        if HAS_POS:
            kpos = tl.load(kpos_base + (S + cols) * stride_kps, mask=col_ok, other=0)
            allowed = _visible(allowed, qpos, kpos, window, chunk, HAS_WINDOW, HAS_CHUNK)
        m_i, l_i, acc = _load_fold(q, k_base, v_base, S + cols, col_ok, allowed, m_i, l_i, acc,
                                   stride_ks, stride_kd, stride_vs, stride_vd, scale, softcap,
                                   HEAD_DK, HEAD_DV, BLOCK_DK, BLOCK_DV, IEEE, HAS_SOFTCAP)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # padding queries past T saw nothing
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :])
