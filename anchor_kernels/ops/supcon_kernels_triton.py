"""Triton kernels of the hard-mined SupCon loss (README "The loss"; FlashAttention-style
streaming over column blocks, never an M x N buffer).

Conventions shared by every kernel:
- ``F`` (M, D) anchors, ``G`` (N, D) contrast rows, ``RF``/``RG`` their inverse norms
  ``1 / max(||x||, eps)`` (1 when not normalising). The normalisation is fused by scaling
  the fp32 dot tile, so no normalised copy is stored.
- Logits live in base 2: ``t_ij = s_ij log2(e) = (f_i . g_j) RF_i RG_j / tau log2(e)``, and
  columns outside the denominator set (the anchor's own column, padding) are ``t = -inf``,
  so ``exp2`` zeroes them without a separate mask. ``-beta cos_ij log2 e = -beta tau t_ij``.
- Labels arrive as dense int32 ids (equal iff the labels are equal; >= 0). Padded columns
  load id -1 and padded rows -2, so they are never positives.
- Anchor i's own column is ``i + SELF_OFFSET``; the launcher passes ``SELF_OFFSET = N`` when
  the anchors are not part of the contrast set, so that no column matches.
- Per-row statistics written by the forward and read by the backward:
  ``LSE`` (natural log, 0 where A(i) is empty), ``SBAR`` (sum_j w_ij s_ij), ``LOGZ2``
  (base-2 log of the soft-weight normaliser sum_{j in P} 2^(-beta cos_ij log2 e)), ``NPOS``
  (|P(i)|, or |A(i)| in log-sum-exp-only mode: the row is in the loss iff NPOS > 0).
- Padded rows are computed but never stored; their gradient weight is 0.
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
def _logits_tile(f, g, row_scale, rg, cols, N, rows, SELF_OFFSET, DOT_PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    """Base-2 logits t (BLOCK_M, BLOCK_N), -inf outside A(i), and the not-self mask.

    row_scale = RF log2(e) / tau; the column bias (0 or -inf) removes padded columns with
    the same fused multiply-add that scales the tile."""
    bias = tl.where(cols < N, 0.0, float("-inf"))
    t = _dot(f, tl.trans(g), DOT_PRECISION, UPCAST) * row_scale[:, None] * rg[None, :] + bias[None, :]
    not_self = cols[None, :] != (rows + SELF_OFFSET)[:, None]
    return tl.where(not_self, t, float("-inf")), not_self


@triton.jit
def _grad_tile(t, pos, lse2, sbar, logz2, npos, gl, beta_tau,
               BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, EXACT: tl.constexpr):
    """G_ij = dL/ds_ij for one tile. The anchor statistics come pre-broadcast: (BLOCK_M, 1)
    when the anchors are the tile's rows, (1, BLOCK_N) when they are its columns.

    detached weights: g_i (p_ij - w_ij); exact soft weights: g_i (p_ij - w_ij (1 - beta tau (s_ij - sbar_i))).
    """
    p = tl.exp2(t - lse2)  # 0 where t = -inf
    if LSE_ONLY:
        gt = p
    else:
        if BETA_ZERO:
            w = tl.where(pos, 1.0 / tl.maximum(npos, 1).to(tl.float32), 0.0)
        else:
            w = tl.exp2(-beta_tau * t - logz2)
            if EXACT:
                w = w * (1.0 - beta_tau * (t * 0.6931471805599453 - sbar))
            w = tl.where(pos, w, 0.0)  # after the product: t = -inf off P would give 0 * inf
        gt = p - w
    # gl is 0 on anchors outside the loss; where(), not a product, keeps a stray inf out.
    return tl.where(npos > 0, gt * gl, 0.0)


@triton.jit
def _supcon_fwd_kernel(
    F, G, YF, YG, RF, RG,  # inputs
    LOSS, LSE, SBAR, LOGZ2, NPOS,  # (M,) outputs
    PART,  # (6, SPLITS, M) float32 partial statistics when SPLIT
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, SELF_OFFSET,
    inv_tau, beta, COLS_PER_SPLIT,
    BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M anchors and column chunk, one pass over its contrast rows: an
    online log-sum-exp over A(i) and an online softmax of -beta cos over P(i) with its
    weighted logit sum, so L_i = LSE_i - sbar_i is finished without revisiting any tile.
    With SPLIT (small M: too few row blocks to fill the GPU) the columns are cut into
    chunks, one per program along grid axis 1, and _supcon_fwd_combine_kernel merges them."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col_lo = split * COLS_PER_SPLIT
    col_hi = tl.minimum(N, col_lo + COLS_PER_SPLIT)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    f = tl.load(F + rows[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                mask=rmask[:, None] & (offs_d[None, :] < D), other=0.0)
    row_scale = tl.load(RF + rows, mask=rmask, other=0.0) * (inv_tau * 1.4426950408889634)
    yf = tl.load(YF + rows, mask=rmask, other=-2)
    beta_tau = beta / inv_tau

    # Running maxima start finite, so exp2(m_old - m_new) never sees -inf - -inf.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max of t over A
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(t - m_i)
    wm_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max of -beta tau t over P
    wl_i = tl.zeros([BLOCK_M], tl.float32)  # running soft-weight normaliser
    ws_i = tl.zeros([BLOCK_M], tl.float32)  # running weighted sum of t
    n_i = tl.zeros([BLOCK_M], tl.int32)

    for start in range(col_lo, col_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < col_hi
        g = tl.load(G + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                    mask=cmask[:, None] & (offs_d[None, :] < D), other=0.0)
        rg = tl.load(RG + cols, mask=cmask, other=0.0)
        yg = tl.load(YG + cols, mask=cmask, other=-1)
        t, not_self = _logits_tile(f, g, row_scale, rg, cols, col_hi, rows, SELF_OFFSET,
                                   DOT_PRECISION, UPCAST)
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m_i = m_new
        if LSE_ONLY:
            n_i += tl.sum((t > float("-inf")).to(tl.int32), axis=1)
        else:
            pos = (yf[:, None] == yg[None, :]) & not_self
            n_i += tl.sum(pos.to(tl.int32), axis=1)
            if BETA_ZERO:
                ws_i += tl.sum(tl.where(pos, t, 0.0), axis=1)
            else:
                u = tl.where(pos, -beta_tau * t, float("-inf"))
                wm_new = tl.maximum(wm_i, tl.max(u, axis=1))
                alpha = tl.exp2(wm_i - wm_new)
                e = tl.exp2(u - wm_new[:, None])
                wl_i = wl_i * alpha + tl.sum(e, axis=1)
                ws_i = ws_i * alpha + tl.sum(tl.where(pos, e * t, 0.0), axis=1)
                wm_i = wm_new

    if SPLIT:
        part = PART + split * M + rows
        stride = tl.num_programs(1) * M
        tl.store(part, m_i, mask=rmask)
        tl.store(part + stride, l_i, mask=rmask)
        tl.store(part + 2 * stride, wm_i, mask=rmask)
        tl.store(part + 3 * stride, wl_i, mask=rmask)
        tl.store(part + 4 * stride, ws_i, mask=rmask)
        tl.store(part + 5 * stride, n_i.to(tl.float32), mask=rmask)
    else:
        _finish_row_stats(rows, rmask, m_i, l_i, wm_i, wl_i, ws_i, n_i,
                          LOSS, LSE, SBAR, LOGZ2, NPOS, BETA_ZERO, LSE_ONLY)


@triton.jit
def _finish_row_stats(rows, rmask, m_i, l_i, wm_i, wl_i, ws_i, n_i,
                      LOSS, LSE, SBAR, LOGZ2, NPOS, BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr):
    """Per-anchor loss and the statistics the backward reads, from the running sums."""
    valid = n_i > 0
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.maximum(l_i, 1e-30))) * 0.6931471805599453, 0.0)
    if LSE_ONLY:
        sbar = tl.zeros_like(lse)
        logz2 = tl.zeros_like(lse)
    elif BETA_ZERO:
        sbar = ws_i * 0.6931471805599453 / tl.maximum(n_i, 1).to(tl.float32)
        logz2 = tl.zeros_like(lse)
    else:
        sbar = tl.where(valid, ws_i * 0.6931471805599453 / tl.maximum(wl_i, 1e-30), 0.0)
        logz2 = tl.where(valid, wm_i + tl.log2(tl.maximum(wl_i, 1e-30)), 0.0)
    tl.store(LOSS + rows, tl.where(valid, lse - sbar, 0.0), mask=rmask)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(SBAR + rows, sbar, mask=rmask)
    tl.store(LOGZ2 + rows, logz2, mask=rmask)
    tl.store(NPOS + rows, n_i, mask=rmask)


@triton.jit
def _supcon_fwd_combine_kernel(
    PART, LOSS, LSE, SBAR, LOGZ2, NPOS, M, SPLITS,
    BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Merges the column chunks' running statistics (log-sum-exp style rescaling)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    stride = SPLITS * M
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    wm_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    for split in range(0, SPLITS):
        part = PART + split * M + rows
        m_i = tl.maximum(m_i, tl.load(part, mask=rmask, other=-1.0e30))
        wm_i = tl.maximum(wm_i, tl.load(part + 2 * stride, mask=rmask, other=-1.0e30))
    l_i = tl.zeros([BLOCK_M], tl.float32)
    wl_i = tl.zeros([BLOCK_M], tl.float32)
    ws_i = tl.zeros([BLOCK_M], tl.float32)
    n_i = tl.zeros([BLOCK_M], tl.int32)
    for split in range(0, SPLITS):
        part = PART + split * M + rows
        scale = tl.exp2(tl.load(part, mask=rmask, other=-1.0e30) - m_i)
        l_i += tl.load(part + stride, mask=rmask, other=0.0) * scale
        wscale = tl.exp2(tl.load(part + 2 * stride, mask=rmask, other=-1.0e30) - wm_i)
        wl_i += tl.load(part + 3 * stride, mask=rmask, other=0.0) * wscale
        ws = tl.load(part + 4 * stride, mask=rmask, other=0.0)
        if BETA_ZERO:
            ws_i += ws
        else:
            ws_i += ws * wscale
        n_i += tl.load(part + 5 * stride, mask=rmask, other=0.0).to(tl.int32)
    _finish_row_stats(rows, rmask, m_i, l_i, wm_i, wl_i, ws_i, n_i,
                      LOSS, LSE, SBAR, LOGZ2, NPOS, BETA_ZERO, LSE_ONLY)


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
def _load_anchor_stats(idx, mask, LSE, SBAR, LOGZ2, NPOS, GL):
    """The forward's statistics and dL/dL_i of anchors ``idx``; padding loads NPOS = 0, GL = 0."""
    lse2 = tl.load(LSE + idx, mask=mask, other=0.0) * 1.4426950408889634
    sbar = tl.load(SBAR + idx, mask=mask, other=0.0)
    logz2 = tl.load(LOGZ2 + idx, mask=mask, other=0.0)
    npos = tl.load(NPOS + idx, mask=mask, other=0)
    gl = tl.load(GL + idx, mask=mask, other=0.0)
    return lse2, sbar, logz2, npos, gl


@triton.jit
def _supcon_bwd_rows_kernel(
    F, G, YF, YG, RF, RG, LSE, SBAR, LOGZ2, NPOS, GL,  # inputs
    DF,  # (M, D) output; with SPLIT, (SPLITS, M, D) float32 partial dz
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, stride_dfm, stride_dfd, SELF_OFFSET,
    inv_tau, beta, COLS_PER_SPLIT,
    SINGLE_SET: tl.constexpr, NORMALIZE: tl.constexpr, BETA_ZERO: tl.constexpr,
    LSE_ONLY: tl.constexpr, EXACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of the anchors, one program per BLOCK_M rows, recomputing each S tile.

    Two sets: dz_i = sum_j G_ij c_j / tau (the dQ pass). One set (G is F, stats shared):
    dz_k = sum_j (G_kj + G_jk) z_j / tau, with G_jk from the same tile and the column rows'
    statistics, so the whole gradient comes from this one pass with no atomics.
    With SPLIT each program sums one column chunk into its own slice of DF, and
    _supcon_bwd_finish_kernel adds the slices and applies the normalisation backward."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    col_lo = split * COLS_PER_SPLIT
    col_hi = tl.minimum(N, col_lo + COLS_PER_SPLIT)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    dmask = offs_d[None, :] < D
    f = tl.load(F + rows[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                mask=rmask[:, None] & dmask, other=0.0)
    rf = tl.load(RF + rows, mask=rmask, other=0.0)
    row_scale = rf * (inv_tau * 1.4426950408889634)
    yf = tl.load(YF + rows, mask=rmask, other=-2)
    lse2, sbar, logz2, npos, gl = _load_anchor_stats(rows, rmask, LSE, SBAR, LOGZ2, NPOS, GL)
    beta_tau = beta / inv_tau
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(col_lo, col_hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cmask = cols < col_hi
        g = tl.load(G + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                    mask=cmask[:, None] & dmask, other=0.0)
        rg = tl.load(RG + cols, mask=cmask, other=0.0)
        yg = tl.load(YG + cols, mask=cmask, other=-1)
        t, not_self = _logits_tile(f, g, row_scale, rg, cols, col_hi, rows, SELF_OFFSET,
                                   DOT_PRECISION, UPCAST)
        pos = (yf[:, None] == yg[None, :]) & not_self
        h = _grad_tile(t, pos, lse2[:, None], sbar[:, None], logz2[:, None], npos[:, None],
                       gl[:, None], beta_tau, BETA_ZERO, LSE_ONLY, EXACT)
        if SINGLE_SET:
            # The column rows are anchors too: add their terms G_ji, read off the same tile
            # (t, A and P are symmetric when the sets coincide). Padded rows i give finite
            # junk in row i of h only, which is never stored.
            c_lse2, c_sbar, c_logz2, c_npos, c_gl = _load_anchor_stats(
                cols, cmask, LSE, SBAR, LOGZ2, NPOS, GL)
            h += _grad_tile(t, pos, c_lse2[None, :], c_sbar[None, :], c_logz2[None, :],
                            c_npos[None, :], c_gl[None, :], beta_tau, BETA_ZERO, LSE_ONLY, EXACT)
        acc += _dot((h * rg[None, :]).to(g.dtype), g, DOT_PRECISION, UPCAST)

    _store_grad(DF, split, rows, offs_d, rmask[:, None] & dmask, f, rf, acc * inv_tau, M, D,
                stride_dfm, stride_dfd, NORMALIZE, SPLIT)


@triton.jit
def _store_grad(OUT, split, rows, offs_d, mask, x, r, dz, ROWS, D, stride_om, stride_od,
                NORMALIZE: tl.constexpr, SPLIT: tl.constexpr):
    """The finished gradient, or (SPLIT) this chunk's dz into the (SPLITS, ROWS, D) buffer."""
    if SPLIT:
        tl.store(OUT + split * ROWS * D + rows[:, None] * D + offs_d[None, :], dz, mask=mask)
    else:
        dx = _normalize_backward(x, r, dz, NORMALIZE)
        tl.store(OUT + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                 dx.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _supcon_bwd_finish_kernel(
    X, R, PART, OUT, ROWS, D, SPLITS, stride_xm, stride_xd, stride_om, stride_od,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sums the chunks' dz and applies the normalisation backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < ROWS) & (offs_d[None, :] < D)
    dz = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, SPLITS):
        dz += tl.load(PART + split * ROWS * D + rows[:, None] * D + offs_d[None, :], mask=mask,
                      other=0.0)
    x = tl.load(X + rows[:, None] * stride_xm + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
    r = tl.load(R + rows, mask=rows < ROWS, other=0.0)
    dx = _normalize_backward(x, r, dz, NORMALIZE)
    tl.store(OUT + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
             dx.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _supcon_bwd_cols_kernel(
    F, G, YF, YG, RF, RG, LSE, SBAR, LOGZ2, NPOS, GL,  # inputs
    DG,  # (N, D) output; with SPLIT, (SPLITS, N, D) float32 partial dc
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, stride_dgn, stride_dgd, SELF_OFFSET,
    inv_tau, beta, ROWS_PER_SPLIT,
    NORMALIZE: tl.constexpr, BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr,
    EXACT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradient of the contrast rows (two sets; the dK pass): dc_j = sum_i G_ij z_i / tau,
    one program per BLOCK_N contrast rows, looping over anchor blocks and recomputing S.
    Padded anchor rows have NPOS = 0, so their G is 0. SPLIT cuts the anchors into chunks
    as the rows kernel cuts the columns."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row_lo = split * ROWS_PER_SPLIT
    row_hi = tl.minimum(M, row_lo + ROWS_PER_SPLIT)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cmask = cols < N
    dmask = offs_d[None, :] < D
    g = tl.load(G + cols[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                mask=cmask[:, None] & dmask, other=0.0)
    rg = tl.load(RG + cols, mask=cmask, other=0.0)
    yg = tl.load(YG + cols, mask=cmask, other=-1)
    beta_tau = beta / inv_tau
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for start in range(row_lo, row_hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_hi
        f = tl.load(F + rows[:, None] * stride_fm + offs_d[None, :] * stride_fd,
                    mask=rmask[:, None] & dmask, other=0.0)
        rf = tl.load(RF + rows, mask=rmask, other=0.0)
        yf = tl.load(YF + rows, mask=rmask, other=-2)
        lse2, sbar, logz2, npos, gl = _load_anchor_stats(rows, rmask, LSE, SBAR, LOGZ2, NPOS, GL)
        t, not_self = _logits_tile(f, g, rf * (inv_tau * 1.4426950408889634), rg, cols, N, rows,
                                   SELF_OFFSET, DOT_PRECISION, UPCAST)
        pos = (yf[:, None] == yg[None, :]) & not_self
        h = _grad_tile(t, pos, lse2[:, None], sbar[:, None], logz2[:, None], npos[:, None],
                       gl[:, None], beta_tau, BETA_ZERO, LSE_ONLY, EXACT)
        acc += _dot(tl.trans(h * rf[:, None]).to(f.dtype), f, DOT_PRECISION, UPCAST)

    _store_grad(DG, split, cols, offs_d, cmask[:, None] & dmask, g, rg, acc * inv_tau, N, D,
                stride_dgn, stride_dgd, NORMALIZE, SPLIT)
