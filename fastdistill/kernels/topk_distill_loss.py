"""Triton kernel of topk_distill_loss (same math as csrc/cpu/topk_distill_loss.cpp).

One program per row. The k ids and log-probs are swept in BLOCK_K chunks of "categories"
c in [0, k]: c < k is a top-k id, c == k the rest bucket (bucket tail only), so one code path runs
the divergence formulas of kernels/distill_loss.py over k (+1) categories. Only the bucket tail and
the hard-label term sweep the student row (BLOCK_V chunks):
  bucket: sweep 1 the max of s = z / T, sweep 2 S = sum exp(s - max) accumulated in fp64 per lane;
  the rest mass R = S - (the same fp32 exp terms at the k ids), also in fp64, so R stays accurate
  when it is a tiny fraction of S. If R < 1e-20 (e.g. a +1e4 spike on a top-k id underflows the
  rest), an extra sweep finds the rest's own max by comparing positions with the ids and R is
  recomputed around it.
The gradient sweep writes every entry (the rest bucket's share, or 0, plus the hard-label term);
after a barrier the k ids are overwritten. Fixed-order sums, no atomics: bitwise deterministic.
An id outside [0, V) is never read; it makes its row's loss and gradient NaN. Duplicate ids are
undefined (the Python layer's validate=True rejects them).
"""
import triton
import triton.language as tl

from fastdistill.kernels.distill_loss import (KL, NEG_INF, POS_INF, _f32, _grad_s, _log_sum, _online_softmax,
                                              _row_terms, pick_block_v, pick_num_warps)

TINY_REST = tl.constexpr(1e-20)
REST_BLOCK_V = 32  # positions per step of the rare rest-max sweep ([REST_BLOCK_V, BLOCK_K] compares)


@triton.jit
def _load_categories(c0, cats, K, k_lim, V, s_row, lp_row, id_row):
    """Chunk c0 + cats of the k ids: (index, is an id, id, id in range, raw z at the id, lp).
    k_lim is K, or 0 on an ignored row (nothing is read)."""
    c = c0 + cats
    is_id = c < K
    read = c < k_lim
    ids = tl.load(id_row + c, mask=read, other=0).to(tl.int64)
    ok = (ids >= 0) & (ids < V)
    z = tl.load(s_row + ids, mask=read & ok, other=NEG_INF).to(tl.float32)
    lp = tl.load(lp_row + c, mask=read, other=NEG_INF).to(tl.float32)
    return c, is_id, ids, ok, z, lp


@triton.jit
def _category_logs(c, is_id, rest_slot, z, lp, inv_t, a0, a1, b0, b1, lp_rest, lq_rest, BUCKET: tl.constexpr):
    """(log p, log q, delta = log p - log q) of categories c; c == rest_slot (K, or -1 when the rest
    bucket is empty) is the rest bucket, the others past K are empty (p = q = 0). bucket: a0, a1 = max
    and log-sum of the full softmax of s; renormalize: (a0, a1) and (b0, b1) those of the k log-probs
    and of the k gathered s. delta comes from the two
    log-probs, exact near 0 where they matter (lp - s would subtract a logit that may be ~1e4)."""
    s = z * inv_t
    if BUCKET:
        lpc = lp
        lqc = (s - a0) - a1
    else:
        lpc = (lp - a0) - a1
        lqc = (s - b0) - b1
    delta = lpc - lqc
    if BUCKET:
        rest = c == rest_slot
        lpc = tl.where(is_id, lpc, tl.where(rest, lp_rest, NEG_INF))
        lqc = tl.where(is_id, lqc, tl.where(rest, lq_rest, NEG_INF))
        delta = tl.where(is_id, delta, tl.where(rest, lp_rest - lq_rest, 0.0))
    else:
        lpc = tl.where(is_id, lpc, NEG_INF)
        lqc = tl.where(is_id, lqc, NEG_INF)
        delta = tl.where(is_id, delta, 0.0)
    return lpc, lqc, delta


@triton.jit
def _category_grad(lp, lq, delta, D, C, P, w, w1m, log_w, log_1mw, DIV: tl.constexpr):
    """dD/ds of a category's logit; kl keeps P = sum p (the bucket tail's p may not sum to 1)."""
    if DIV == KL:
        g = tl.exp(lq) * P - tl.exp(lp)
    else:
        g = _grad_s(lp, lq, delta, D, C, w, w1m, log_w, log_1mw, DIV)
    return g


@triton.jit
def _rest_max(s_row, id_row, V, v_lim, K, inv_t, BLOCK_K: tl.constexpr, RB: tl.constexpr):
    """max of s = z / T over the positions that are not top-k ids (O(V k) compares: rare path)."""
    m = NEG_INF
    vcols = tl.arange(0, RB)
    kcols = tl.arange(0, BLOCK_K)
    for start in range(0, V, RB):
        offs = start + vcols
        s = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32) * inv_t
        hits = tl.zeros([RB], dtype=tl.int32)
        for c0 in range(0, K, BLOCK_K):
            ids = tl.load(id_row + c0 + kcols, mask=c0 + kcols < K, other=-1).to(tl.int64)
            hits += tl.sum((offs[:, None] == ids[None, :]).to(tl.int32), axis=1)
        m = tl.maximum(m, tl.max(tl.where(hits > 0, NEG_INF, s), axis=0))
    return m


@triton.jit
def _topk_distill_loss_kernel(
    S, s_stride, LP, lp_stride, IDX, idx_stride, L, SCALE, LOSS, G, V, K,
    inv_t, w, w1m, log_w, log_1mw, soft_coef, grad_coef, hard_weight, ignore_index,
    DIV: tl.constexpr, BUCKET: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr, CE_OWN: tl.constexpr,
    WRITE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, RB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    lp_row = LP + row * lp_stride
    id_row = IDX + row * idx_stride
    g_row = G + row * V
    scale = tl.load(SCALE)
    cols = tl.arange(0, BLOCK_V)
    cats = tl.arange(0, BLOCK_K)
    if HAS_LABELS:
        label = tl.load(L + row)
        valid = label != ignore_index
    else:
        label = -1
        valid = row >= 0  # always true, as a tensor
    # Loop bounds that are 0 on ignored rows: masks built from them skip all reads there (and,
    # unlike `vector_mask & valid`, survive the interpreter, which widens a broadcast bool).
    v_lim = tl.where(valid, V, 0)
    k_lim = tl.where(valid, K, 0)

    # Student row statistics: max of s (bucket), online softmax of the raw z (hard-label term).
    m_s = NEG_INF
    m_z = NEG_INF
    a_z = 0.0
    if BUCKET or CE_OWN:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32)
            if BUCKET:
                m_s = tl.maximum(m_s, tl.max(z * inv_t, axis=0))
            if CE_OWN:
                m_z, a_z = _online_softmax(m_z, a_z, z)
    S64 = tl.zeros([BLOCK_V], dtype=tl.float64)
    if BUCKET:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32)
            S64 += tl.exp(z * inv_t - m_s).to(tl.float64)
    total = tl.sum(S64, axis=0)
    ls_s = tl.log(total.to(tl.float32))

    # Sweep 1 over the k ids: range check; bucket: teacher mass and the ids' student terms;
    # renormalize: softmax statistics of the log-probs and of the gathered s.
    n_bad = 0
    p_ids = tl.zeros([BLOCK_K], dtype=tl.float64)
    e_ids = tl.zeros([BLOCK_K], dtype=tl.float64)
    m_t = NEG_INF
    a_t = 0.0
    m_k = NEG_INF
    a_k = 0.0
    for c0 in range(0, K, BLOCK_K):
        c, is_id, ids, ok, z, lp = _load_categories(c0, cats, K, k_lim, V, s_row, lp_row, id_row)
        # bad ids, and NaN / +inf log-probs (the bucket's p = exp(lp) would turn +inf into 0 rest mass)
        n_bad += tl.sum((is_id & (~ok | ~(lp < POS_INF))).to(tl.int32), axis=0)
        if BUCKET:
            p_ids += tl.where(is_id, tl.exp(lp), 0.0).to(tl.float64)
            e_ids += tl.exp(z * inv_t - m_s).to(tl.float64)  # the same fp32 terms as in S64
        else:
            m_t, a_t = _online_softmax(m_t, a_t, lp)
            m_k, a_k = _online_softmax(m_k, a_k, z * inv_t)
    # The NaN rule (as csrc/include/fd_math.h) over what the row reads: NaN or +inf in the k log-probs,
    # the student logits at the ids, or the whole student row when it is read (bucket, hard-label
    # term) gives a NaN loss and gradient row. Free: each makes a softmax sum NaN (exp(NaN), or
    # exp(inf - inf) at a +inf max); ignored rows (nothing read, total = exp(-inf + inf)) stay zeros.
    bad = (n_bad > 0) | (total != total) | (a_z != a_z) | (a_t != a_t) | (a_k != a_k)
    if HAS_LABELS:
        bad = bad & valid

    # The rest bucket (bucket tail, k < V): p_rest clamped at 0, q_rest = R / S.
    lp_rest = NEG_INF
    lq_rest = NEG_INF
    shift_r = m_s
    R = tl.maximum(total - tl.sum(e_ids, axis=0), 0.0)
    if BUCKET:
        if (R < TINY_REST) & (K < V):  # the rest underflowed around the row max: redo it around its max
            m_r = _rest_max(s_row, id_row, V, v_lim, K, inv_t, BLOCK_K, RB)
            shift_r = tl.where(m_r == NEG_INF, 0.0, m_r)
            acc = tl.zeros([BLOCK_V], dtype=tl.float64)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                s = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32) * inv_t
                acc += tl.where(s > m_r, 0.0, tl.exp(s - shift_r)).to(tl.float64)
            e_r = tl.zeros([BLOCK_K], dtype=tl.float64)
            for c0 in range(0, K, BLOCK_K):
                c, is_id, ids, ok, z, lp = _load_categories(c0, cats, K, k_lim, V, s_row, lp_row, id_row)
                s = z * inv_t
                e_r += tl.where(s > m_r, 0.0, tl.exp(s - shift_r)).to(tl.float64)
            R = tl.maximum(tl.sum(acc, axis=0) - tl.sum(e_r, axis=0), 0.0)
        p_rest = tl.maximum(1.0 - tl.sum(p_ids, axis=0), 0.0).to(tl.float32)
        live = K < V
        lp_rest = tl.where(live & (p_rest > 0), tl.log(p_rest), NEG_INF)
        lq_rest = tl.where(live & (R > 0), (shift_r - m_s) + tl.log(R.to(tl.float32)) - ls_s, NEG_INF)
        rest_slot = tl.where(live & ((p_rest > 0) | (R > 0)), K, -1)  # -1: no rest category
        a0 = m_s
        a1 = ls_s
    else:
        a0 = m_t
        a1 = _log_sum(m_t, a_t)
        rest_slot = -1
    b0 = m_k
    b1 = _log_sum(m_k, a_k)

    # Sweep 2 over the categories: D, C (row constants of the gradient) and P = sum p.
    d_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    c_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    p_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, K + 1, BLOCK_K):
        c, is_id, ids, ok, z, lp = _load_categories(c0, cats, K, k_lim, V, s_row, lp_row, id_row)
        lpc, lqc, delta = _category_logs(c, is_id, rest_slot, z, lp, inv_t, a0, a1, b0, b1, lp_rest, lq_rest,
                                         BUCKET)
        d, cc = _row_terms(lpc, lqc, delta, w, w1m, log_w, log_1mw, DIV)
        d_acc += d
        c_acc += cc
        p_acc += tl.exp(lpc)
    D = tl.sum(d_acc, axis=0)
    C = tl.sum(c_acc, axis=0)
    P = tl.sum(p_acc, axis=0)

    if CE_OWN:
        ls_z = _log_sum(m_z, a_z)
    else:  # bucket tail at T = 1: the same softmax
        m_z = m_s
        ls_z = ls_s
    loss = soft_coef * D
    if CE:
        # An out-of-range label yields NaN (a kernel cannot raise); the CPU backend raises instead.
        in_range = (label >= 0) & (label < V)
        z_label = tl.load(S + row * s_stride + label, mask=valid & in_range, other=float("nan")).to(tl.float32)
        loss += hard_weight * ((m_z - z_label) + ls_z)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LOSS + row, tl.where(valid, loss * scale, 0.0))

    if WRITE:
        gc = grad_coef * scale
        hc = hard_weight * scale
        a_rest = 0.0
        if BUCKET:
            # A rest entry j gets its share of the rest, exp(s_j - shift_r) / R, of the rest's gradient.
            d_rest = tl.where(rest_slot == K, lp_rest - lq_rest, 0.0)
            g_rest = _category_grad(lp_rest, lq_rest, d_rest, D, C, P, w, w1m, log_w, log_1mw, DIV)
            a_rest = tl.where(R > 0, gc * g_rest / R.to(tl.float32), 0.0)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
            if BUCKET or CE:
                z = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32)
            if BUCKET:  # top-k entries (the only ones that can exceed shift_r) are overwritten below
                g += tl.exp(tl.minimum(z * inv_t - shift_r, 0.0)) * a_rest
            if CE:
                g += hc * (tl.exp((z - m_z) - ls_z) - tl.where(offs == label, 1.0, 0.0))
            g = tl.where(bad, float("nan"), tl.where(valid, g, 0.0))
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the sweep's stores land before the ids' stores to the same row
        for c0 in range(0, K, BLOCK_K):
            c, is_id, ids, ok, z, lp = _load_categories(c0, cats, K, k_lim, V, s_row, lp_row, id_row)
            lpc, lqc, delta = _category_logs(c, is_id, rest_slot, z, lp, inv_t, a0, a1, b0, b1, lp_rest,
                                             lq_rest, BUCKET)
            g = gc * _category_grad(lpc, lqc, delta, D, C, P, w, w1m, log_w, log_1mw, DIV)
            if CE:
                g += hc * (tl.exp((z - m_z) - ls_z) - tl.where(ids == label, 1.0, 0.0))
            tl.store(g_row + ids, g.to(G.dtype.element_ty), mask=(c < tl.where(bad, 0, k_lim)) & ok)


def pick_block_k(K: int) -> int:
    return max(16, min(128, triton.next_power_of_2(K + 1)))


def topk_distill_loss_triton_launch(student, logprobs, indices, labels, scale, loss, grad, *, bucket: bool,
                                    divergence: int, inv_t: float, w: float, log_w: float, log_1mw: float,
                                    soft_coef: float, grad_coef: float, hard_weight: float, ignore_index: int,
                                    interpret: bool) -> None:
    """student (N, V), logprobs / indices (N, k) with unit last stride; labels (N,) int64 or None;
    loss (N,) fp32; grad (N, V) contiguous in the student dtype, or None for loss only.
    interpret: the interpreter's configuration (BLOCK_V capped at 1024, its only difference); False is
    the GPU configuration, also under TRITON_INTERPRET (tests/test_triton_gpu_config.py runs it)."""
    N, V = student.shape
    K = indices.shape[1]
    if N == 0:
        return
    block_v = pick_block_v(V, interpret)
    num_warps = pick_num_warps(block_v)
    write = grad is not None
    ce = hard_weight != 0.0 and labels is not None
    _topk_distill_loss_kernel[(N,)](
        student, student.stride(0), logprobs, logprobs.stride(0), indices, indices.stride(0),
        labels if labels is not None else loss, scale, loss, grad if write else student, V, K,
        *(_f32(x) for x in (inv_t, w, 1.0 - w, log_w, log_1mw, soft_coef, grad_coef, hard_weight)), ignore_index,
        DIV=divergence, BUCKET=bucket, HAS_LABELS=labels is not None, CE=ce,
        CE_OWN=ce and (not bucket or inv_t != 1.0), WRITE=write, BLOCK_V=block_v, BLOCK_K=pick_block_k(K),
        RB=REST_BLOCK_V, num_warps=num_warps,
        enable_fp_fusion=False,  # identical fp32 exp terms in S and at the ids; x / T - max exactly 0
    )
