"""Triton kernel of the fused distillation loss (same algorithm as csrc/include/fd_divergence.h).

One program per row; the row is swept in BLOCK_V chunks (online softmax), so any V works without
a [rows, V] float32 temporary: sweep 1 softmax statistics, sweep 2 (divergences that need a row
constant) D and C, sweep 3 gradient (and D for kl/mse). Accumulators are per-lane vectors summed
once at the end: fixed order, no atomics, bitwise deterministic.
"""
import struct

import triton
import triton.language as tl

# Compiled (non-interpreted) Triton only lets kernels read globals that are tl.constexpr.
KL, REVERSE_KL, JSD, TVD, SKEW_KL, SKEW_REVERSE_KL, MSE = (tl.constexpr(code) for code in range(7))
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
# No NaN global: Triton re-checks a kernel's globals at every launch with `!=`, and NaN != NaN
# ("Global variable NAN has changed" on GPU). Kernels write float("nan") inline instead.
_MSE_CODE = 6  # for the host-side launcher


@triton.jit
def _online_softmax(m, acc, x):
    """Merge chunk x into the running (max m, sum of exp(x - m)) of one row."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    shift = tl.where(m_new == NEG_INF, 0.0, m_new)
    acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    return m_new, acc


@triton.jit
def _log_sum(m, acc):
    """log of the softmax denominator relative to m. log p = (x - m) - log_sum keeps m and log_sum
    apart (like torch.log_softmax), so |logits| ~ 1e4 loses no digits to one rounded lse."""
    return tl.where(m == NEG_INF, 0.0, tl.log(acc))


@triton.jit
def _log_mix(a, log_wa, b, log_wb):
    """log(e^(a + log_wa) + e^(b + log_wb)); -inf when both vanish."""
    x = a + log_wa
    y = b + log_wb
    mx = tl.maximum(x, y)
    safe = tl.where(mx == NEG_INF, 0.0, mx)
    return tl.where(mx == NEG_INF, NEG_INF, safe + tl.log(1.0 + tl.exp(tl.minimum(x, y) - safe)))


@triton.jit
def _log_ratio(lp, lq, raw, kd):
    """delta = log p - log q from whichever of raw - kd and lp - lq rounds less; see log_ratio in
    csrc/include/fd_divergence.h."""
    return tl.where(tl.abs(raw) + tl.abs(kd) <= tl.abs(lp) + tl.abs(lq), raw - kd, lp - lq)


@triton.jit
def _log_m_ratios(delta, log_w, log_1mw, DIV: tl.constexpr):
    """(log m/p, log m/q) from delta = log p/q; see log_m_ratios in csrc/include/fd_divergence.h."""
    if DIV == SKEW_REVERSE_KL:
        lwp = log_1mw
        lwq = log_w
    else:
        lwp = log_w
        lwq = log_1mw
    pos = delta > 0
    L = _log_mix(tl.where(pos, 0.0, delta), lwp, tl.where(pos, -delta, 0.0), lwq)
    return tl.where(pos, L, L - delta), tl.where(pos, L + delta, L)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def _row_terms(lp, lq, delta, w, w1m, log_w, log_1mw, DIV: tl.constexpr):
    """Per-element contributions (d, c) to the divergence D and the row constant C."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    c = tl.zeros_like(lp)
    if DIV == KL:  # lp - lq rather than delta: exactly 0 where p == q (e.g. V = 1)
        d = tl.where(p > 0, p * (lp - lq), 0.0)
    elif DIV == REVERSE_KL:
        d = tl.where(q > 0, q * (lq - lp), 0.0)
    elif DIV == TVD:
        d = 0.5 * tl.abs(p - q)
        c = 0.5 * q * _sign(q - p)
    else:
        lmp, lmq = _log_m_ratios(delta, log_w, log_1mw, DIV)
        if DIV == JSD:
            c = tl.where(q > 0, -q * lmq, 0.0)
            d = tl.where(p > 0, -w * p * lmp, 0.0) + w1m * c
        elif DIV == SKEW_KL:
            d = tl.where(p > 0, -p * lmp, 0.0)
            c = tl.where(p > 0, tl.exp(lq - lmp), 0.0)
        else:  # SKEW_REVERSE_KL
            d = tl.where(q > 0, -q * lmq, 0.0)
            c = tl.where(q > 0, tl.exp(lq - lmq), 0.0)
    return d, c


@triton.jit
def _grad_s(lp, lq, delta, D, C, w, w1m, log_w, log_1mw, DIV: tl.constexpr):
    """dD/ds for s = student / T, given the row's D and C."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIV == KL:
        g = q - p
    elif DIV == REVERSE_KL:
        g = tl.where(q > 0, q * ((lq - lp) - D), 0.0)
    elif DIV == TVD:
        g = q * (0.5 * _sign(q - p) - C)
    else:
        lmp, lmq = _log_m_ratios(delta, log_w, log_1mw, DIV)
        if DIV == JSD:
            g = tl.where(q > 0, -w1m * q * (lmq + C), 0.0)
        elif DIV == SKEW_KL:
            r = tl.where(p > 0, tl.exp(lq - lmp), 0.0)
            g = -w1m * (r - q * C)
        else:  # SKEW_REVERSE_KL
            g = tl.where(q > 0, -q * lmq - w * tl.exp(lq - lmq) - q * (D - w * C), 0.0)
    return g


@triton.jit
def _distill_loss_kernel(
    S, s_stride, T, t_stride, L, SCALE, LOSS, G, V,
    inv_t, w, w1m, log_w, log_1mw, soft_coef, grad_coef, inv_v, hard_weight, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, CE: tl.constexpr, CE_OWN: tl.constexpr,
    WRITE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * s_stride
    t_row = T + row * t_stride
    g_row = G + row * V
    scale = tl.load(SCALE)
    cols = tl.arange(0, BLOCK_V)
    if HAS_LABELS:
        label = tl.load(L + row)
        valid = label != ignore_index
    else:
        label = -1
        valid = True
    other = 0.0 if DIV == MSE else NEG_INF

    # Sweep 1: softmax statistics.
    m_s = NEG_INF
    a_s = 0.0
    m_t = NEG_INF
    a_t = 0.0
    m_z = NEG_INF
    a_z = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        z = tl.load(s_row + offs, mask=mask, other=other).to(tl.float32)
        if DIV != MSE:
            y = tl.load(t_row + offs, mask=mask, other=other).to(tl.float32)
            m_s, a_s = _online_softmax(m_s, a_s, z * inv_t)
            m_t, a_t = _online_softmax(m_t, a_t, y * inv_t)
        if CE_OWN:
            m_z, a_z = _online_softmax(m_z, a_z, tl.where(mask, z, NEG_INF))
    # The NaN rule (as csrc/include/fd_math.h): NaN or +inf anywhere in the row gives a NaN loss and
    # an all-NaN gradient row; -inf is a masked token. No extra work per element: either makes the
    # running sum NaN (exp(NaN), or exp(inf - inf) at a +inf max; whether tl.max drops NaN or not).
    # mse has no softmax: sweep 3 counts them.
    bad = (a_s != a_s) | (a_t != a_t)
    ls_s = _log_sum(m_s, a_s)
    ls_t = _log_sum(m_t, a_t)
    if CE_OWN:
        ls_z = _log_sum(m_z, a_z)
    else:
        m_z = m_s
        ls_z = ls_s

    # delta = log p - log q = (teacher - student) / T - kd or lp - lq, whichever rounds less (_log_ratio).
    kd = (m_t - m_s) + (ls_t - ls_s)

    # Sweep 2: D and C for divergences whose gradient needs them.
    D = 0.0
    C = 0.0
    if (DIV != KL) and (DIV != MSE):
        d_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        c_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(s_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
            y = tl.load(t_row + offs, mask=mask, other=NEG_INF).to(tl.float32)
            lp = (y * inv_t - m_t) - ls_t
            lq = (z * inv_t - m_s) - ls_s
            d, c = _row_terms(lp, lq, _log_ratio(lp, lq, (y - z) * inv_t, kd), w, w1m, log_w, log_1mw, DIV)
            d_acc += tl.where(mask, d, 0.0)
            c_acc += tl.where(mask, c, 0.0)
        D = tl.sum(d_acc, axis=0)
        C = tl.sum(c_acc, axis=0)

    # Sweep 3: gradient (and D for kl / mse).
    if WRITE or (DIV == KL) or (DIV == MSE):
        gc = grad_coef * scale
        hc = hard_weight * scale
        d_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        n_bad = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            z = tl.load(s_row + offs, mask=mask, other=other).to(tl.float32)
            y = tl.load(t_row + offs, mask=mask, other=other).to(tl.float32)
            if DIV == MSE:
                n_bad += tl.where((z < POS_INF) & (y < POS_INF), 0, 1)
                diff = z - y
                d_acc += diff * diff
                g = gc * diff
            else:
                lp = (y * inv_t - m_t) - ls_t
                lq = (z * inv_t - m_s) - ls_s
                delta = _log_ratio(lp, lq, (y - z) * inv_t, kd)
                if DIV == KL:
                    d, c = _row_terms(lp, lq, delta, w, w1m, log_w, log_1mw, DIV)
                    d_acc += tl.where(mask, d, 0.0)
                g = gc * _grad_s(lp, lq, delta, D, C, w, w1m, log_w, log_1mw, DIV)
            if CE:
                g += hc * (tl.exp((z - m_z) - ls_z) - tl.where(offs == label, 1.0, 0.0))
            if WRITE:
                g = tl.where(valid, g, 0.0)
                tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)
        if DIV == MSE:
            D = tl.sum(d_acc, axis=0) * inv_v
            bad = tl.sum(n_bad, axis=0) > 0
        elif DIV == KL:
            D = tl.sum(d_acc, axis=0)

    if HAS_LABELS:
        bad = bad & valid  # ignored rows stay zeros whatever they hold
    if WRITE:
        # Bad rows only (the loop is empty otherwise): overwrite the gradient row with NaN.
        for start in range(0, tl.where(bad, V, 0), BLOCK_V):
            tl.debug_barrier()  # sweep 3's stores to these addresses land first
            offs = start + cols
            tl.store(g_row + offs, tl.full([BLOCK_V], float("nan"), tl.float32).to(G.dtype.element_ty),
                     mask=offs < V)
    loss = soft_coef * D
    if CE:
        # An out-of-range label yields NaN (a kernel cannot raise); the CPU backend raises instead.
        in_range = (label >= 0) & (label < V)
        z_label = tl.load(s_row + label, mask=valid & in_range, other=float("nan")).to(tl.float32)
        loss += hard_weight * ((m_z - z_label) + ls_z)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LOSS + row, tl.where(valid, loss * scale, 0.0))


def _f32(x: float) -> float:
    """Round to a float32 value: Triton types a float argument as fp64 when float32 cannot hold it
    exactly (e.g. beta = 1e-300), which would turn the whole kernel into fp64 math."""
    return struct.unpack("f", struct.pack("f", x))[0]


def pick_block_v(V: int, interpret: bool) -> int:
    cap = 1024 if interpret else 8192
    return max(16, min(cap, triton.next_power_of_2(V)))


def pick_num_warps(block_v: int) -> int:
    return 4 if block_v <= 2048 else (8 if block_v <= 4096 else 16)


def distill_loss_triton_launch(student, teacher, labels, scale, loss, grad, *, divergence: int, inv_t: float,
                               w: float, log_w: float, log_1mw: float, soft_coef: float, grad_coef: float,
                               hard_weight: float, ignore_index: int, interpret: bool) -> None:
    """student/teacher (N, V) with unit vocab stride; labels (N,) int64 or None; loss (N,) fp32;
    grad (N, V) contiguous in the student dtype, or None for loss only.
    interpret: the interpreter's configuration (BLOCK_V capped at 1024, its only difference); False is
    the GPU configuration, also under TRITON_INTERPRET (tests/test_triton_gpu_config.py runs it)."""
    N, V = student.shape
    if N == 0:
        return
    block_v = pick_block_v(V, interpret)
    num_warps = pick_num_warps(block_v)
    write = grad is not None
    ce = hard_weight != 0.0 and labels is not None
    _distill_loss_kernel[(N,)](
        student, student.stride(0), teacher, teacher.stride(0),
        labels if labels is not None else loss, scale, loss, grad if write else student, V,
        *(_f32(x) for x in (inv_t, w, 1.0 - w, log_w, log_1mw, soft_coef, grad_coef, 1.0 / V, hard_weight)),
        ignore_index,
        DIV=divergence, HAS_LABELS=labels is not None, CE=ce, CE_OWN=ce and (inv_t != 1.0 or divergence == _MSE_CODE),
        WRITE=write, BLOCK_V=block_v, num_warps=num_warps,
        enable_fp_fusion=False,  # x / T - max must be exactly 0 at the max, as in the C++ kernels
    )
