"""Triton kernel of sampled_distill_loss (same math as csrc/cpu/sampled_distill_loss.cpp).

One program per row. With s = z / T, q = softmax(s) over the full vocabulary and k draws x_j with
teacher log-probs lp_j (estimator "counts", fastdistill/cache/sampling.py):
  loss = soft_coef * mean_j (lp_j - log q(x_j)) + hard_weight * CE(z, label)
  grad = grad_coef * (q - p_hat) + hard-label term,  p_hat(x) = #{j : x_j = x} / k
Sweep 1 over V (BLOCK_V chunks): online softmax of s (and of z for the hard-label term at T != 1).
Sweep 2 over the draws (BLOCK_K chunks): the loss terms and the NaN rule's checks.
Gradient: a sweep over V writes grad_coef * q (+ the hard-label term) everywhere; after a barrier each
distinct drawn id is written once more, by its first draw, with its whole value recomputed in fp32 and
its count taken over all k draws (a [BLOCK_K, BLOCK_K] compare per pair of chunks). So duplicates
never race, nothing is read back in the output dtype, and there are no atomics: bitwise deterministic.
An id outside [0, V) is never read; it makes its row's loss and gradient NaN.
"""
import triton
import triton.language as tl

from fastdistill.kernels.distill_loss import NEG_INF, POS_INF, _f32, _log_sum, _online_softmax, pick_block_v, \
    pick_num_warps


@triton.jit
def _sampled_distill_loss_kernel(
    S, s_stride, LP, lp_stride, IDX, idx_stride, L, SCALE, LOSS, G, V, K,
    inv_t, soft_coef, grad_coef, hard_weight, ignore_index,
    HAS_LABELS: tl.constexpr, CE: tl.constexpr, CE_OWN: tl.constexpr, WRITE: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
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
    # Loop bounds that are 0 on ignored rows: masks built from them skip all reads there (as in topk).
    v_lim = tl.where(valid, V, 0)
    k_lim = tl.where(valid, K, 0)

    m_s = NEG_INF
    a_s = 0.0
    m_z = NEG_INF
    a_z = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32)
        m_s, a_s = _online_softmax(m_s, a_s, z * inv_t)
        if CE_OWN:
            m_z, a_z = _online_softmax(m_z, a_z, z)
    ls_s = _log_sum(m_s, a_s)

    n_bad = 0
    d_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, K, BLOCK_K):
        c = c0 + cats
        read = c < k_lim
        ids = tl.load(id_row + c, mask=read, other=0).to(tl.int64)
        ok = (ids >= 0) & (ids < V)
        z = tl.load(s_row + ids, mask=read & ok, other=0.0).to(tl.float32)
        lp = tl.load(lp_row + c, mask=read, other=0.0).to(tl.float32)
        # NaN / +inf log-prob, or -inf (a drawn token has probability > 0), or an id out of range
        n_bad += tl.sum((read & (~ok | ~(lp < POS_INF) | (lp == NEG_INF))).to(tl.int32), axis=0)
        d_acc += tl.where(read, lp - ((z * inv_t - m_s) - ls_s), 0.0)
    # The NaN rule over the student row: NaN or +inf makes a softmax sum NaN; all -inf has no softmax.
    bad = (n_bad > 0) | (a_s != a_s) | (a_z != a_z) | (m_s == NEG_INF)
    if HAS_LABELS:
        bad = bad & valid

    if CE_OWN:
        ls_z = _log_sum(m_z, a_z)
    else:  # T = 1: the same softmax
        m_z = m_s
        ls_z = ls_s
    loss = soft_coef * (tl.sum(d_acc, axis=0) / K)
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
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(s_row + offs, mask=offs < v_lim, other=NEG_INF).to(tl.float32)
            g = gc * tl.exp((z * inv_t - m_s) - ls_s)
            if CE:
                g += hc * (tl.exp((z - m_z) - ls_z) - tl.where(offs == label, 1.0, 0.0))
            g = tl.where(bad, float("nan"), tl.where(valid, g, 0.0))
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=offs < V)
        tl.debug_barrier()  # the sweep's stores land before the draws' stores to the same row
        k_write = tl.where(bad, 0, k_lim)
        for c0 in range(0, K, BLOCK_K):
            c = c0 + cats
            read = c < k_write
            ids = tl.load(id_row + c, mask=read, other=-1).to(tl.int64)
            ok = (ids >= 0) & (ids < V)
            count = tl.zeros([BLOCK_K], dtype=tl.int32)
            earlier = tl.zeros([BLOCK_K], dtype=tl.int32)
            for c1 in range(0, K, BLOCK_K):
                o = c1 + cats
                other = tl.load(id_row + o, mask=o < k_write, other=-1).to(tl.int64)
                same = (ids[:, None] == other[None, :]) & (o < k_write)[None, :]
                count += tl.sum(same.to(tl.int32), axis=1)
                earlier += tl.sum((same & (o[None, :] < c[:, None])).to(tl.int32), axis=1)
            z = tl.load(s_row + ids, mask=read & ok, other=0.0).to(tl.float32)
            g = gc * (tl.exp((z * inv_t - m_s) - ls_s) - count.to(tl.float32) / K)
            if CE:
                g += hc * (tl.exp((z - m_z) - ls_z) - tl.where(ids == label, 1.0, 0.0))
            tl.store(g_row + ids, g.to(G.dtype.element_ty), mask=read & ok & (earlier == 0))


def pick_block_k(K: int) -> int:
    return max(16, min(64, triton.next_power_of_2(K)))


def sampled_distill_loss_triton_launch(student, logprobs, indices, labels, scale, loss, grad, *, inv_t: float,
                                       soft_coef: float, grad_coef: float, hard_weight: float, ignore_index: int,
                                       interpret: bool) -> None:
    """student (N, V), logprobs / indices (N, k) with unit last stride; labels (N,) int64 or None;
    loss (N,) fp32; grad (N, V) contiguous in the student dtype, or None for loss only.
    interpret: the interpreter's configuration (BLOCK_V capped at 1024), as in topk_distill_loss."""
    N, V = student.shape
    K = indices.shape[1]
    if N == 0:
        return
    block_v = pick_block_v(V, interpret)
    write = grad is not None
    ce = hard_weight != 0.0 and labels is not None
    _sampled_distill_loss_kernel[(N,)](
        student, student.stride(0), logprobs, logprobs.stride(0), indices, indices.stride(0),
        labels if labels is not None else loss, scale, loss, grad if write else student, V, K,
        *(_f32(x) for x in (inv_t, soft_coef, grad_coef, hard_weight)), ignore_index,
        HAS_LABELS=labels is not None, CE=ce, CE_OWN=ce and inv_t != 1.0, WRITE=write, BLOCK_V=block_v,
        BLOCK_K=pick_block_k(K), num_warps=pick_num_warps(block_v),
    )
