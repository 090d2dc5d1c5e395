"""Triton kernel for batched tree attention (jit code only; checks and launch live in ops.py).

One program computes BLOCK_M of the T queries of one (row, head): first the row's cached
prefix ``[start, end)`` (ragged per row), then the TK tree keys that follow position S under
the bit-packed ancestor mask (the queries are the last T of those TK nodes), with an online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022).
Grouped-query attention: query head h reads KV head ``h // GROUP``.
"""

import triton
import triton.language as tl


@triton.jit
def _fold_block(q, k, v, allowed, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """Fold one block of keys (k: HEAD_DIM x N, v: N x HEAD_DIM) into the running max m_i,
    normaliser l_i and output acc; ``allowed`` (BLOCK_M x N) masks the scores."""
    if IEEE:  # float32 products, no TF32 rounding
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * scale
    else:
        s = tl.dot(q, k) * scale
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
def _tree_attention_fwd(
    Q, K, V, O, START, END, BITS,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_bb, stride_bt, stride_bw,
    H, T, TK, S, scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: B * Hk * S * D can pass 2**31 at long prefixes
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    # queries of this block, (BLOCK_M, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    start = tl.load(START + b)
    end = tl.load(END + b)

    # phase 1: the row's cached prefix [start, end), every query sees all of it
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < end
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)
        allowed = row_ok[:, None] & col_ok[None, :]
        m_i, l_i, acc = _fold_block(q, k, v, allowed, m_i, l_i, acc, scale, IEEE)

    # phase 2: the tree's keys at S + j (j < TK), allowed where bit j of the query's mask is set
    bits_base = BITS + b * stride_bb
    for n0 in range(0, TK, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < TK
        k = tl.load(k_base + (S + cols)[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + (S + cols)[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None], other=0.0)
        words = tl.load(bits_base + offs_m[:, None] * stride_bt + (cols // 32)[None, :] * stride_bw,
                        mask=row_ok[:, None] & col_ok[None, :], other=0)
        allowed = (((words >> (cols % 32)[None, :]) & 1) != 0) & col_ok[None, :]
        m_i, l_i, acc = _fold_block(q, k, v, allowed, m_i, l_i, acc, scale, IEEE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # padding queries past T saw nothing
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
