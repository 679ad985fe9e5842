"""Triton-side numerics shared by the kernels (the PyTorch twin is ``tokpo_kernels/numerics.py``):
the logit tile and its transform, the online-softmax updates of the forward, and the universal
gradient ``dz_tile`` of the backward.

Policy: fp32 accumulators for logits and statistics, -inf for masked columns in max reductions and
0 in sums (selected with ``tl.where`` so that ``0·(−inf)`` never forms a NaN). Addressing: every
index that is multiplied by a stride or a row length is int64 first (rows, vocabulary columns,
hidden columns): a transposed view such as ``W.t()`` of a (D, V) matrix has
``stride_wd = V``, and ``d·V`` passes 2³¹ at V = 256000, D ≈ 8400, where an int32 product would
wrap and read out of bounds. What stays int32 cannot pass 2³¹: offsets below V or N (biases are
made contiguous by the launcher) and the target slot ``j·stride_tj`` (the ops hand over freshly
built, contiguous (N, J) ids, so ``stride_tj = 1``).

Online accumulators per row, for the policy logits ``z`` with running max ``m``::

    s = Σ exp(z − m)                      (so lse = m + log s)
    e = Σ exp(z − m)·(z − m)              (so H = log s − e/s)

and for the reference ``z_r`` with running max ``m_r``::

    s_r = Σ exp(z_r − m_r)
    a   = Σ exp(z_r − m_r)·((z_r − m_r) − (z − m))     (so KL = a/s_r + log s − log s_r)

Every term is relative to its row maximum, so logits of magnitude 1e4 lose no precision to
cancellation and KL is exactly 0 when reference and policy logits are bitwise equal. When ``m``
grows by ``dm`` and ``m_r`` by ``dm_r`` (``α = exp(−dm_r)``): ``e ← exp(−dm)(e − dm·s)`` and
``a ← α(a + s_r(dm − dm_r))`` before the new tile is added.
"""

import triton
import triton.language as tl


@triton.jit
def compacted_rows(row_index_ptr, start, n_valid, BLOCK_N: tl.constexpr):
    """Original row ids (int64) of compacted rows ``start .. start + BLOCK_N`` and their mask.

    ``row_index`` lists the valid rows first; ``n_valid`` of them exist (a device value).
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(row_index_ptr + offs_n, mask=row_mask, other=0).to(tl.int64)
    return rows, row_mask


@triton.jit
def tanh_f32(x):
    """tanh through exp of a non-positive argument, so it never overflows."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Raw logits ``h[rows] · W[offs_v]ᵀ (+ b)`` as an fp32 (BLOCK_N, BLOCK_V) tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_hn
    w_cols = w_ptr + offs_v[:, None].to(tl.int64) * stride_wv
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # int64: d·stride may pass 2³¹ (module docstring)
        d_mask = offs_d < D
        h = tl.load(h_rows + offs_d[None, :] * stride_hd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_cols + offs_d[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            # The Triton 3.9 interpreter miscomputes tl.dot on bf16 operands: upcast there only.
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        # [BLOCK_N, BLOCK_D] @ [BLOCK_D, BLOCK_V] -> [BLOCK_N, BLOCK_V], accumulated in fp32
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def transform_logits(raw, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """``z = softcap·tanh(raw/softcap) / temperature`` (softcap optional)."""
    if HAS_SOFTCAP:
        raw = softcap * tanh_f32(raw / softcap)
    return raw * inv_temperature


@triton.jit
def max_shift(m):
    """Twin of ``numerics.max_shift``: 0 where the running max is -inf (no finite logit yet, e.g. a
    fully masked tile), so that ``z - shift`` never forms ``-inf - (-inf)`` and the row's sum stays 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_softmax_step(m, s, e, z, NEED_E: tl.constexpr):
    """Fold tile ``z`` (−inf in masked columns) into ``(m, s, e)``; also returns ``dm = m_new − m``."""
    m_new = tl.maximum(m, tl.max(z, 1))
    dm = tl.where(m == float("-inf"), 0.0, m_new - m)
    m_shift = max_shift(m_new)
    scale = tl.exp(m - m_shift)
    zc = z - m_shift[:, None]
    p = tl.exp(zc)
    if NEED_E:
        e = scale * (e - dm * s) + tl.sum(tl.where(p > 0.0, p * zc, 0.0), 1)
    s = s * scale + tl.sum(p, 1)
    return m_new, s, e, dm


@triton.jit
def online_kl_step(mr, sr, a, zr, z, m_new, dm):
    """Fold reference tile ``zr`` (with the matching policy tile ``z`` already folded, whose new
    max is ``m_new`` after a growth of ``dm``) into ``(mr, sr, a)``."""
    mr_new = tl.maximum(mr, tl.max(zr, 1))
    dmr = tl.where(mr == float("-inf"), 0.0, mr_new - mr)
    mr_shift = max_shift(mr_new)
    m_shift = max_shift(m_new)
    alpha = tl.exp(mr - mr_shift)
    zrc = zr - mr_shift[:, None]
    q = tl.exp(zrc)
    a = alpha * (a + sr * (dm - dmr)) + tl.sum(tl.where(q > 0.0, q * (zrc - (z - m_shift[:, None])), 0.0), 1)
    sr = alpha * sr + tl.sum(q, 1)
    return mr_new, sr, a


@triton.jit
def fold_policy_tile(m, s, e, zsum, z, col_mask, NEED_ENTROPY: tl.constexpr, NEED_SUM: tl.constexpr):
    """Fold the transformed policy tile ``z`` (valid in ``col_mask`` columns) into ``(m, s, e)`` and
    the plain fp32 sum ``zsum`` (linear in ``z``: no max shift). Returns them with the masked tile
    and the growth ``dm`` of ``m``, which ``fold_reference_tile`` needs."""
    if NEED_SUM:
        zsum += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
    # −inf outside the valid columns: they never win the max and add exp(−inf) = 0.
    z = tl.where(col_mask[None, :], z, float("-inf"))
    m, s, e, dm = online_softmax_step(m, s, e, z, NEED_ENTROPY)
    return m, s, e, zsum, z, dm


@triton.jit
def fold_reference_tile(mr, sr, a, zr, z, m, dm, col_mask, NEED_KL: tl.constexpr):
    """Fold the transformed reference tile ``zr`` into ``(mr, sr, a)``, after the matching policy
    tile (``z`` masked, ``m``, ``dm`` from ``fold_policy_tile``). Called after the policy's fold,
    so that the reference tile is computed only then (fewer tiles live at once)."""
    zr = tl.where(col_mask[None, :], zr, float("-inf"))
    if NEED_KL:
        mr, sr, a = online_kl_step(mr, sr, a, zr, z, m, dm)
    else:
        mr, sr, a, _ = online_softmax_step(mr, sr, a, zr, False)
    return mr, sr, a


# The universal gradient (docs/methods.md §1). With p = softmax(z), ℓ = log p = z − lse,
# q = softmax(z_ref) (fixed) and per-row cotangents of lse, KL, H and Σ_v z_v:
#
#     ∂lse/∂z = p      ∂KL/∂z = p − q      ∂H/∂z = −p ⊙ (ℓ + H)      ∂(Σ_v z_v)/∂z = 1
#
# (∂ℓ_v/∂z_k = δ_vk − p_k and ∂p_v/∂z_k = p_v (δ_vk − p_k). H = −Σ p ℓ: the p ∂ℓ part sums to 0,
#  leaving −Σ_v p_v (δ_vk − p_k) ℓ_v = −p_k ℓ_k − p_k H. KL = Σ q (ℓ_ref − ℓ): −Σ_v q_v (δ_vk − p_k)
#  = p_k − q_k.) So
#
#     ∂L/∂z = (g_lse + g_kl)·p − g_kl·q − g_H·p ⊙ (ℓ + H) + g_Σ
#
# with g_p = g_lse + g_kl folded by the caller. The target terms Σ_j g_j·e_{y_j} are sparse and
# scattered separately (target_grad_tile), as in the torch twin numerics.universal_dz_.


@triton.jit
def dz_tile(
    logp, g_p, ent, g_ent, logq, g_kl, g_sum, tile_mask,
    USE_ENTROPY: tl.constexpr, USE_Q: tl.constexpr, USE_SUM: tl.constexpr,
):
    """``∂L/∂z`` on a (BLOCK_N, BLOCK_V) tile, without the target term (Triton twin of
    ``numerics.universal_dz_``; derivation above).

    ``logp`` / ``logq``: the policy / reference log-probability tiles; ``g_p = g_lse + g_kl``,
    ``ent``, ``g_ent``, ``g_kl``, ``g_sum``: per-row (BLOCK_N,) vectors; arguments of a disabled
    term are not read. Returns ``(dz, peak)``: 0 outside ``tile_mask``, and the largest ``p``
    (and ``q``) of the tile, which decides whether ``filter_eps`` may skip it.
    """
    p = tl.where(tile_mask, tl.exp(logp), 0.0)
    dz = p * g_p[:, None]
    peak = tl.max(p)
    if USE_ENTROPY:
        # A masked logit (ℓ = −inf, p = 0) contributes nothing, not 0·inf = NaN.
        dz -= tl.where(p > 0.0, g_ent[:, None] * p * (logp + ent[:, None]), 0.0)
    if USE_Q:
        q = tl.where(tile_mask, tl.exp(logq), 0.0)
        dz -= g_kl[:, None] * q
        peak = tl.maximum(peak, tl.max(q))
    if USE_SUM:
        # Uniform over every vocabulary column, −inf (masked-vocabulary) logits included: Σ_v z_v
        # counts them, as the torch twin does.
        dz += tl.where(tile_mask, g_sum[:, None], 0.0)
    return dz, peak


@triton.jit
def target_grad_tile(dz, tgt_ptr, g_tgt_ptr, rows, row_mask, offs_v, J, stride_tn, stride_tj):
    """``dz += Σ_j g_j · e_{y_j}`` on this tile (ignored targets carry g_j = 0).

    Also returns how many target ids of valid rows fall in the tile (tiles holding a target are
    never filtered)."""
    hits = 0
    for j in range(0, J):
        t = tl.load(tgt_ptr + rows * stride_tn + j * stride_tj, mask=row_mask, other=-1)
        g = tl.load(g_tgt_ptr + rows * J + j, mask=row_mask, other=0.0)
        hit = offs_v[None, :] == t[:, None]
        dz += tl.where(hit, g[:, None], 0.0)
        hits += tl.sum(hit.to(tl.int32))
    return dz, hits
