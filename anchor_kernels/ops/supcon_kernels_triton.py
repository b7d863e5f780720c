"""Triton kernels of the hard-mined SupCon loss (README "The loss"; FlashAttention-style
streaming over column blocks, never an M x N buffer).

Conventions shared by every kernel:
- ``F`` (M, D) anchors, ``G`` (N, D) contrast rows, ``RF``/``RG`` their inverse norms
  ``1 / max(||x||, eps)`` (1 when not normalising). ``cos_ij = (f_i . g_j) RF_i RG_j``: the
  normalisation is fused by scaling the fp32 dot tile, so no normalised copy is stored.
- Exponentials are base 2: ``t = s log2(e)``; ``LSE2`` is the row log-sum-exp in that domain.
- Anchor i's own column is ``i + SELF_OFFSET``; the launcher passes ``SELF_OFFSET = N`` when
  the anchors are not part of the contrast set, so that no column matches.
- Per-row statistics written by the forward and read by the backward:
  ``LSE`` (natural log, 0 where A(i) is empty), ``SBAR`` (sum_j w_ij s_ij), ``LOGZ2``
  (base-2 log of the soft-weight normaliser sum_{j in P} 2^(-beta cos_ij log2 e)), ``NPOS``
  (|P(i)|, or |A(i)| in log-sum-exp-only mode: the row is in the loss iff NPOS > 0).
"""

import triton
import triton.language as tl

@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST is set only under the interpreter for bfloat16,
    whose tl.dot there returns garbage (triton 3.9); compiled kernels never take it."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _row_masks(rows, cols, YR, YC, M, N, SELF_OFFSET):
    """(BLOCK_M, BLOCK_N) masks of the denominator set A and the positives P."""
    in_a = (rows[:, None] < M) & (cols[None, :] < N) & (cols[None, :] != rows[:, None] + SELF_OFFSET)
    pos = in_a & (YR[:, None] == YC[None, :])
    return in_a, pos


@triton.jit
def _grad_tile(cos, in_a, pos, lse2, sbar, logz2, npos, gl, inv_tau, beta, tau,
               BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, EXACT: tl.constexpr):
    """G_ij = dL/ds_ij for one tile. The anchor statistics come pre-broadcast: (BLOCK_M, 1)
    when the anchors are the tile's rows, (1, BLOCK_N) when they are its columns.

    detached weights: g_i (p_ij - w_ij); exact soft weights: g_i (p_ij - w_ij (1 - beta tau (s_ij - sbar_i))).
    """
    p = tl.where(in_a, tl.exp2(cos * (inv_tau * 1.4426950408889634) - lse2), 0.0)
    if LSE_ONLY:
        gt = p
    else:
        if BETA_ZERO:
            w = tl.where(pos, 1.0 / tl.maximum(npos, 1).to(tl.float32), 0.0)
        else:
            w = tl.where(pos, tl.exp2(-beta * 1.4426950408889634 * cos - logz2), 0.0)
            if EXACT:
                w = w * (1.0 - beta * tau * (cos * inv_tau - sbar))
        gt = p - w
    # gl is 0 on anchors outside the loss; where(), not a product, keeps a stray inf out.
    return tl.where(npos > 0, gt * gl, 0.0)


@triton.jit
def _supcon_fwd_kernel(
    F, G, YF, YG, RF, RG,  # inputs
    LOSS, LSE, SBAR, LOGZ2, NPOS,  # (M,) outputs
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, SELF_OFFSET,
    inv_tau, beta,
    BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M anchors, one pass over the contrast rows: an online
    log-sum-exp over A(i) and an online softmax of -beta cos over P(i) with its weighted
    logit sum, so L_i = LSE_i - sbar_i is finished without revisiting any tile."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    f = tl.load(F + rows[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    rf = tl.load(RF + rows, mask=rmask, other=0.0)
    yf = tl.load(YF + rows, mask=rmask, other=0)
    scale2 = inv_tau * 1.4426950408889634

    # Running maxima start finite, so exp2(m_old - m_new) never sees -inf - -inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max of t over A
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(t - m_i)
    wm_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max of -beta cos log2e over P
    wl_i = tl.zeros([BLOCK_M], tl.float32)  # running soft-weight normaliser
    ws_i = tl.zeros([BLOCK_M], tl.float32)  # running weighted sum of s
    n_i = tl.zeros([BLOCK_M], tl.int32)

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        g = tl.load(G + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                    mask=cmask[:, None] & (offs_d[None, :] < D), other=0.0)
        rg = tl.load(RG + cols, mask=cmask, other=0.0)
        yg = tl.load(YG + cols, mask=cmask, other=0)
        cos = _dot(f, tl.trans(g), DOT_PRECISION, UPCAST) * rf[:, None] * rg[None, :]
        in_a, pos = _row_masks(rows, cols, yf, yg, M, N, SELF_OFFSET)
        t = tl.where(in_a, cos * scale2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m_i = m_new
        if LSE_ONLY:
            n_i += tl.sum(in_a.to(tl.int32), axis=1)
        else:
            n_i += tl.sum(pos.to(tl.int32), axis=1)
            s = cos * inv_tau
            if BETA_ZERO:
                ws_i += tl.sum(tl.where(pos, s, 0.0), axis=1)
            else:
                u = tl.where(pos, -beta * 1.4426950408889634 * cos, float("-inf"))
                wm_new = tl.maximum(wm_i, tl.max(u, axis=1))
                alpha = tl.exp2(wm_i - wm_new)
                e = tl.exp2(u - wm_new[:, None])
                wl_i = wl_i * alpha + tl.sum(e, axis=1)
                ws_i = ws_i * alpha + tl.sum(e * s, axis=1)
                wm_i = wm_new

    valid = n_i > 0
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1e-30))) * 0.6931471805599453, 0.0)
    if LSE_ONLY:
        sbar = tl.zeros([BLOCK_M], tl.float32)
        logz2 = tl.zeros([BLOCK_M], tl.float32)
    elif BETA_ZERO:
        sbar = ws_i / tl.maximum(n_i, 1).to(tl.float32)
        logz2 = tl.zeros([BLOCK_M], tl.float32)
    else:
        sbar = tl.where(valid, ws_i / tl.maximum(wl_i, 1e-30), 0.0)
        logz2 = tl.where(valid, wm_i + tl.log2(tl.maximum(wl_i, 1e-30)), 0.0)
    tl.store(LOSS + rows, tl.where(valid, lse - sbar, 0.0), mask=rmask)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(SBAR + rows, sbar, mask=rmask)
    tl.store(LOGZ2 + rows, logz2, mask=rmask)
    tl.store(NPOS + rows, n_i, mask=rmask)


@triton.jit
def _normalize_backward(x, r, dz, NORMALIZE: tl.constexpr):
    """df = r (dz - z (z . dz)) with z = x r; the projection vanishes where ||x|| <= eps
    (there max(||x||, eps) is the constant eps, as in reference.NORM_EPS)."""
    if NORMALIZE:
        xf = x.to(tl.float32)
        projected = tl.sum(xf * xf, axis=1) > 1e-24  # ||x|| > eps = 1e-12
        zdz = tl.where(projected, tl.sum(xf * dz, axis=1) * r, 0.0)
        return r[:, None] * (dz - (zdz * r)[:, None] * xf)
    else:
        return dz


@triton.jit
def _supcon_bwd_rows_kernel(
    F, G, YF, YG, RF, RG, LSE, SBAR, LOGZ2, NPOS, GL,  # inputs
    DF,  # (M, D) output
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, stride_dfm, stride_dfd, SELF_OFFSET,
    inv_tau, beta, tau,
    SINGLE_SET: tl.constexpr, NORMALIZE: tl.constexpr, BETA_ZERO: tl.constexpr,
    LSE_ONLY: tl.constexpr, EXACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of the anchors, one program per BLOCK_M rows, recomputing each S tile.

    Two sets: dz_i = sum_j G_ij c_j / tau (the dQ pass). One set (G is F, stats shared):
    dz_k = sum_j (G_kj + G_jk) z_j / tau, with G_jk from the same tile and the column rows'
    statistics, so the whole gradient comes from this one pass with no atomics."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = offs_d[None, :] < D
    f = tl.load(F + rows[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                mask=rmask[:, None] & dmask, other=0.0)
    rf = tl.load(RF + rows, mask=rmask, other=0.0)
    yf = tl.load(YF + rows, mask=rmask, other=0)
    lse2 = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
    sbar = tl.load(SBAR + rows, mask=rmask, other=0.0)
    logz2 = tl.load(LOGZ2 + rows, mask=rmask, other=0.0)
    npos = tl.load(NPOS + rows, mask=rmask, other=0)
    gl = tl.load(GL + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < N
        g = tl.load(G + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                    mask=cmask[:, None] & dmask, other=0.0)
        rg = tl.load(RG + cols, mask=cmask, other=0.0)
        yg = tl.load(YG + cols, mask=cmask, other=0)
        cos = _dot(f, tl.trans(g), DOT_PRECISION, UPCAST) * rf[:, None] * rg[None, :]
        in_a, pos = _row_masks(rows, cols, yf, yg, M, N, SELF_OFFSET)
        h = _grad_tile(cos, in_a, pos, lse2[:, None], sbar[:, None], logz2[:, None],
                       npos[:, None], gl[:, None], inv_tau, beta, tau, BETA_ZERO, LSE_ONLY, EXACT)
        if SINGLE_SET:
            # The column rows are anchors too: add their terms G_ji, read off the same tile
            # transposed (cos is symmetric, A and P are symmetric when the sets coincide).
            c_lse2 = tl.load(LSE + cols, mask=cmask, other=0.0) * 1.4426950408889634
            c_sbar = tl.load(SBAR + cols, mask=cmask, other=0.0)
            c_logz2 = tl.load(LOGZ2 + cols, mask=cmask, other=0.0)
            c_npos = tl.load(NPOS + cols, mask=cmask, other=0)
            c_gl = tl.load(GL + cols, mask=cmask, other=0.0)
            h += _grad_tile(cos, in_a, pos, c_lse2[None, :], c_sbar[None, :], c_logz2[None, :],
                            c_npos[None, :], c_gl[None, :], inv_tau, beta, tau,
                            BETA_ZERO, LSE_ONLY, EXACT)
        acc += _dot((h * rg[None, :]).to(g.dtype), g, DOT_PRECISION, UPCAST)

    df = _normalize_backward(f, rf, acc * inv_tau, NORMALIZE)
    tl.store(DF + rows[:, None] * stride_dfm + offs_d[None, :] * stride_dfd,
             df.to(DF.dtype.element_ty), mask=rmask[:, None] & dmask)


@triton.jit
def _supcon_bwd_cols_kernel(
    F, G, YF, YG, RF, RG, LSE, SBAR, LOGZ2, NPOS, GL,  # inputs
    DG,  # (N, D) output
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, stride_dgn, stride_dgd, SELF_OFFSET,
    inv_tau, beta, tau,
    NORMALIZE: tl.constexpr, BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr,
    EXACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of the contrast rows (two sets; the dK pass): dc_j = sum_i G_ij z_i / tau,
    one program per BLOCK_N contrast rows, looping over anchor blocks and recomputing S^T."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cmask = cols < N
    dmask = offs_d[None, :] < D
    g = tl.load(G + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                mask=cmask[:, None] & dmask, other=0.0)
    rg = tl.load(RG + cols, mask=cmask, other=0.0)
    yg = tl.load(YG + cols, mask=cmask, other=0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < M
        f = tl.load(F + rows[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                    mask=rmask[:, None] & dmask, other=0.0)
        rf = tl.load(RF + rows, mask=rmask, other=0.0)
        yf = tl.load(YF + rows, mask=rmask, other=0)
        lse2 = tl.load(LSE + rows, mask=rmask, other=0.0) * 1.4426950408889634
        sbar = tl.load(SBAR + rows, mask=rmask, other=0.0)
        logz2 = tl.load(LOGZ2 + rows, mask=rmask, other=0.0)
        npos = tl.load(NPOS + rows, mask=rmask, other=0)
        gl = tl.load(GL + rows, mask=rmask, other=0.0)
        cos = _dot(f, tl.trans(g), DOT_PRECISION, UPCAST) * rf[:, None] * rg[None, :]
        in_a, pos = _row_masks(rows, cols, yf, yg, M, N, SELF_OFFSET)
        h = _grad_tile(cos, in_a, pos, lse2[:, None], sbar[:, None], logz2[:, None],
                       npos[:, None], gl[:, None], inv_tau, beta, tau, BETA_ZERO, LSE_ONLY, EXACT)
        acc += _dot(tl.trans(h * rf[:, None]).to(f.dtype), f, DOT_PRECISION, UPCAST)

    dg = _normalize_backward(g, rg, acc * inv_tau, NORMALIZE)
    tl.store(DG + cols[:, None] * stride_dgn + offs_d[None, :] * stride_dgd,
             dg.to(DG.dtype.element_ty), mask=cmask[:, None] & dmask)
