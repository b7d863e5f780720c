"""Triton kernels of the hard-mined SupCon loss (README "The loss"; FlashAttention-style
streaming over column blocks, never an M x N buffer). One launch computes the forward,
reduction included; one launch computes every input gradient.

Conventions shared by every kernel:
- ``F`` (M, D) anchors, ``G`` (N, D) contrast rows (``G`` is ``F`` for one set). Labels are
  compared as they come (any integer dtype); padded rows and columns are masked.
- Logits live in base 2: ``t_ij = s_ij log2(e) = (f_i . g_j) RF_i RG_j / tau log2(e)``.
  Columns outside the denominator set (the anchor's own column, padding) get ``t = -inf``,
  and only the tiles that can hold one are masked: the self column can only be in the tiles
  that cross the diagonal band ``[row0 + SELF_OFFSET, row0 + SELF_OFFSET + BLOCK_M)``, padding
  only in the last tile; every other tile runs without masks.
- Anchor i's own column is ``i + SELF_OFFSET``; ``SELF_OFFSET = N`` when the anchors are not
  part of the contrast set, so that no column matches.
- Norms: ``RF = 1 / max(||f||, eps)`` is computed on a copy of the row scaled by a power of two
  (its largest component in [1, 2), an exact scaling), so no finite input overflows or
  underflows. The resident block of a program (its anchors, or its contrast rows in the dK
  part) is multiplied by that power of two before the dot, so dot products of rows of norm
  up to ~1e36 stay finite; the streamed operand is used as stored.
- ``FIXED_SHIFT``: with normalised rows every logit is at most ``shift2 = log2(e)/tau`` (times
  1 + 2^-8 for rounding), so the log-sum-exp uses that bound as its shift instead of a
  running maximum. The launcher enables it only where ``2 shift2 + log2(N) <= 96``: no term
  that matters underflows and ``2^(shift2 - LSE)`` cannot overflow.
- Soft weights ``w_ij = 2^(beta tau (tmin_i - t_ij)) / Z_i`` over positives, with ``tmin_i`` the
  smallest positive logit: the exponent is <= 0 for every positive, so they are finite for
  any finite beta (``-beta cos`` written as a difference before the product).
- Per-anchor statistics, rows of the float32 workspace ``WS`` (see ``supcon_triton.ws_size``): loss_i,
  ``LSE`` (natural log, 0 where A(i) is empty), ``SBAR`` (sum_j w_ij s_ij; with beta > 0
  relative to the hardest positive, sum_j w_ij s_ij - tmin_i ln 2), ``TMIN``, ``LZ``
  (log2 Z_i), ``NPOS`` (|P(i)|, or |A(i)| in log-sum-exp-only mode: anchor i is in the loss
  iff NPOS > 0), then RF, RG and the number of anchors in the loss.
- Column chunks (``SPLIT``): small batches cut the streamed dimension into chunks, one per
  program along grid axis 1. Each program writes its partial state; the last program of a
  row block to finish (a counter in ``LOCKS``, acquire/release) merges every chunk in chunk
  order, so the result does not depend on which program finishes last, and resets the
  counter to 0 for the next launch. The forward's reduction over anchors works the same way.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NORM_EPS = tl.constexpr(1e-12)
# Stats rows of the workspace (each M floats), then RF (M), RG (N; none for one set), count (1).
LOSS_ROW, LSE_ROW, SBAR_ROW, TMIN_ROW, LZ_ROW, NPOS_ROW, STAT_ROWS = (tl.constexpr(i) for i in range(7))
# Partial state of a column chunk: m, l, tmin, wl, ws, n.
PART_ROWS = tl.constexpr(6)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST is set only under the interpreter for bfloat16,
    whose tl.dot there multiplies raw bits; compiled kernels never take it."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_block(X, idx, imask, offs_d, D, stride_r, stride_d, UNMASKED: tl.constexpr):
    """Rows ``idx`` of X (padding 0); UNMASKED: every row in range and D a power of two."""
    ptrs = X + idx[:, None] * stride_r + offs_d[None, :] * stride_d
    if UNMASKED:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=imask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _row_scales(x, NORMALIZE: tl.constexpr, UPCAST: tl.constexpr):
    """(p, r) per row of x: p a power of two with max |x p| in [1, 2) (1 for a zero row; always
    1 for float16, whose products cannot overflow float32), and r = 1 / max(||x||, eps) (1
    without normalisation), computed from x p so that no finite input overflows or underflows.
    The maximum is taken in x's dtype (exact), with no float32 copy of the block (UPCAST: the
    interpreter, whose bfloat16 arithmetic is wrong, takes it in float32)."""
    if x.dtype == tl.float16:
        p = tl.full([x.shape[0]], 1.0, tl.float32)
    else:
        if UPCAST:
            a = tl.max(tl.abs(x.to(tl.float32)), axis=1)
        else:
            a = tl.max(tl.abs(x), axis=1).to(tl.float32)
        e = tl.minimum(tl.maximum(-tl.floor(tl.log2(a)), -126.0), 126.0)
        p = tl.where(a > 0, tl.exp2(e), 1.0)
    if NORMALIZE:
        y = x.to(tl.float32) * p[:, None]
        norm_p = tl.sqrt(tl.sum(y * y, axis=1))  # ||x|| p
        r = p / tl.maximum(norm_p, NORM_EPS * p)
    else:
        r = tl.full(p.shape, 1.0, tl.float32)
    return p, r


@triton.jit
def _scale_rows(x, p, UPCAST: tl.constexpr):
    """x p, in x's dtype: exact, p being a power of two that keeps every component in range."""
    if x.dtype == tl.float16:
        return x
    elif UPCAST:
        return (x.to(tl.float32) * p[:, None]).to(x.dtype)
    else:
        return x * p.to(x.dtype)[:, None]


@triton.jit
def _band(row0, lo, hi, SELF_OFFSET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile starts [band_lo, band_hi) (on the grid lo + k BLOCK_N, within [lo, hi]) of the
    tiles that can hold the self column of rows row0 .. row0 + BLOCK_M - 1."""
    first = row0 + SELF_OFFSET
    band_lo = lo + tl.maximum(first - lo, 0) // BLOCK_N * BLOCK_N
    band_hi = lo + tl.cdiv(tl.maximum(first + BLOCK_M - lo, 0), BLOCK_N) * BLOCK_N
    band_lo = tl.minimum(band_lo, hi)
    band_hi = tl.maximum(tl.minimum(band_hi, hi), band_lo)
    return band_lo, band_hi


@triton.jit
def _logits(a, b, row_scale, col_scale, rows, cols, col_hi, SELF_OFFSET,
            MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Base-2 logits of a tile, a (BLOCK_M, D) @ b (BLOCK_N, D)^T scaled; -inf at the self
    column and at padded columns, which only MASKED tiles can hold."""
    t = _dot(a, tl.trans(b), DOT_PRECISION, UPCAST) * row_scale[:, None] * col_scale[None, :]
    if MASKED:
        keep = (cols[None, :] < col_hi) & (cols[None, :] != (rows + SELF_OFFSET)[:, None])
        t = tl.where(keep, t, float("-inf"))
    return t


@triton.jit
def _fwd_tile(f, yf, row_scale, rows, start, col_hi, G, YG, RG, stride_gn, stride_gd, offs_d, D,
              SELF_OFFSET, beta_tau, shift2, m_i, l_i, tmin_i, wl_i, ws_i, n_i, RG_OUT, write_rg,
              MASKED: tl.constexpr, NORMALIZE: tl.constexpr, NORMS_GIVEN: tl.constexpr,
              WRITE_RG: tl.constexpr, FIXED_SHIFT: tl.constexpr, BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr,
              EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """One column tile of the forward: updates the running log-sum-exp (m, l) over A(i) and,
    unless LSE_ONLY, the positive-set state (tmin, wl, ws, n)."""
    cols = start + tl.arange(0, BLOCK_N)
    cmask = (cols < col_hi) | (not MASKED)  # only the last tile can hold padding
    g = _load_block(G, cols, cmask, offs_d, D, stride_gn, stride_gd, EVEN_D and not MASKED)
    if NORMS_GIVEN:
        rg = tl.load(RG + cols, mask=cmask, other=0.0)
    else:
        _, rg = _row_scales(g, NORMALIZE, UPCAST)
        if WRITE_RG:
            tl.store(RG_OUT + cols, rg, mask=cmask & write_rg)
    t = _logits(f, g, row_scale, rg, rows, cols, col_hi, SELF_OFFSET, MASKED, DOT_PRECISION,
                UPCAST)
    if FIXED_SHIFT:
        l_i += tl.sum(tl.exp2(t - shift2), axis=1)
    else:
        m_new = tl.maximum(m_i, tl.max(t, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m_i = m_new
    if not LSE_ONLY:
        yg = tl.load(YG + cols, mask=cmask, other=0)
        pos = yf[:, None] == yg[None, :]
        if MASKED:
            pos = pos & (t > float("-inf"))
        n_i += tl.sum(pos.to(tl.int32), axis=1)
        if BETA_ZERO:
            ws_i += tl.sum(tl.where(pos, t, 0.0), axis=1)
        else:
            # ws is kept relative to the running minimum, sum_j w_j (t_j - tmin), so that
            # s - sbar has no cancellation in the backward, even for a huge beta.
            tmin_new = tl.minimum(tmin_i, tl.min(tl.where(pos, t, float("inf")), axis=1))
            alpha = tl.exp2(beta_tau * (tmin_new - tmin_i))
            d = tl.where(pos, t - tmin_new[:, None], 0.0)
            e = tl.where(pos, tl.exp2(-beta_tau * d), 0.0)
            ws_i = (ws_i + wl_i * (tmin_i - tmin_new)) * alpha + tl.sum(e * d, axis=1)
            wl_i = wl_i * alpha + tl.sum(e, axis=1)
            tmin_i = tmin_new
    return m_i, l_i, tmin_i, wl_i, ws_i, n_i


@triton.jit
def _acquire_last(LOCKS, idx, total):
    """Whether this program is the last of ``total`` to arrive at counter ``idx`` (every
    program's earlier stores are then visible to it); the last one resets the counter."""
    tl.debug_barrier()
    arrived = tl.atomic_add(LOCKS + idx, 1, sem="acq_rel")
    last = arrived == total - 1
    if last:
        tl.atomic_xchg(LOCKS + idx, 0, sem="relaxed")
    return last


@triton.jit
def _supcon_fwd_kernel(
    F, G, YF, YG,  # inputs
    WS,  # float32 workspace: stats rows, RF, RG, count (see the module docstring)
    LOSS_ROWS,  # (M,) per-anchor loss (the output with reduction "none", else WS's loss row)
    OUT,  # the reduced loss (sum or mean), when REDUCE > 0
    PART, LOCKS,  # chunk partials (PART_ROWS, SPLITS, M) and counters, when SPLIT / REDUCE
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, SELF_OFFSET,
    inv_tau, beta, shift2, scale, COLS_PER_SPLIT,
    M_BUCKET, N_BUCKET,  # autotuning keys only
    NORMALIZE: tl.constexpr, NORMS_GIVEN: tl.constexpr, SINGLE_SET: tl.constexpr,
    BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, FIXED_SHIFT: tl.constexpr,
    REDUCE: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per BLOCK_M anchors (and column chunk): an online log-sum-exp over A(i)
    and an online softmax of -beta cos over P(i) with its weighted logit sum, so that
    L_i = LSE_i - sbar_i is finished without revisiting a tile; then (REDUCE 1: sum,
    2: mean over anchors with a positive) the loss, by the last row block to finish."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    col_lo = split * COLS_PER_SPLIT
    col_hi = tl.maximum(tl.minimum(N, col_lo + COLS_PER_SPLIT), col_lo)
    row0 = pid * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = rows < M
    RF = WS + STAT_ROWS * M
    if SINGLE_SET:
        RG = RF
    else:
        RG = RF + M

    f = _load_block(F, rows, rmask, offs_d, D, stride_fm, stride_fd, False)
    if NORMS_GIVEN:
        p, _ = _row_scales(f, False, UPCAST)
        rf = tl.load(RF + rows, mask=rmask, other=1.0)
    else:
        p, rf = _row_scales(f, NORMALIZE, UPCAST)
        tl.store(RF + rows, rf, mask=rmask & (split == 0))
    f = _scale_rows(f, p, UPCAST)
    row_scale = rf / p * (inv_tau * LOG2E)
    yf = tl.load(YF + rows, mask=rmask, other=0)
    beta_tau = beta / inv_tau
    write_rg = pid == 0  # with WRITE_RG: row block 0 visits every column once
    WRITE_RG: tl.constexpr = (not SINGLE_SET) and (not NORMS_GIVEN)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)  # running max of t (finite start)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(t - m_i) (or 2^(t - shift2))
    tmin_i = tl.full([BLOCK_M], 1.0e30, tl.float32)  # running min of t over P
    wl_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(beta tau (tmin_i - t)) over P
    ws_i = tl.zeros([BLOCK_M], tl.float32)  # running weighted sum of t over P
    n_i = tl.zeros([BLOCK_M], tl.int32)

    # Tiles before the diagonal band, the band, after it, then the last partial tile.
    full_hi = col_lo + (col_hi - col_lo) // BLOCK_N * BLOCK_N
    band_lo, band_hi = _band(row0, col_lo, full_hi, SELF_OFFSET, BLOCK_M, BLOCK_N)
    for start in range(col_lo, band_lo, BLOCK_N):
        m_i, l_i, tmin_i, wl_i, ws_i, n_i = _fwd_tile(
            f, yf, row_scale, rows, start, col_hi, G, YG, RG, stride_gn, stride_gd, offs_d, D,
            SELF_OFFSET, beta_tau, shift2, m_i, l_i, tmin_i, wl_i, ws_i, n_i, RG, write_rg,
            False, NORMALIZE, NORMS_GIVEN, WRITE_RG, FIXED_SHIFT, BETA_ZERO, LSE_ONLY, EVEN_D,
            DOT_PRECISION, UPCAST, BLOCK_N)
    for start in range(band_lo, band_hi, BLOCK_N):
        m_i, l_i, tmin_i, wl_i, ws_i, n_i = _fwd_tile(
            f, yf, row_scale, rows, start, col_hi, G, YG, RG, stride_gn, stride_gd, offs_d, D,
            SELF_OFFSET, beta_tau, shift2, m_i, l_i, tmin_i, wl_i, ws_i, n_i, RG, write_rg,
            True, NORMALIZE, NORMS_GIVEN, WRITE_RG, FIXED_SHIFT, BETA_ZERO, LSE_ONLY, EVEN_D,
            DOT_PRECISION, UPCAST, BLOCK_N)
    for start in range(band_hi, full_hi, BLOCK_N):
        m_i, l_i, tmin_i, wl_i, ws_i, n_i = _fwd_tile(
            f, yf, row_scale, rows, start, col_hi, G, YG, RG, stride_gn, stride_gd, offs_d, D,
            SELF_OFFSET, beta_tau, shift2, m_i, l_i, tmin_i, wl_i, ws_i, n_i, RG, write_rg,
            False, NORMALIZE, NORMS_GIVEN, WRITE_RG, FIXED_SHIFT, BETA_ZERO, LSE_ONLY, EVEN_D,
            DOT_PRECISION, UPCAST, BLOCK_N)
    for start in range(full_hi, col_hi, BLOCK_N):
        m_i, l_i, tmin_i, wl_i, ws_i, n_i = _fwd_tile(
            f, yf, row_scale, rows, start, col_hi, G, YG, RG, stride_gn, stride_gd, offs_d, D,
            SELF_OFFSET, beta_tau, shift2, m_i, l_i, tmin_i, wl_i, ws_i, n_i, RG, write_rg,
            True, NORMALIZE, NORMS_GIVEN, WRITE_RG, FIXED_SHIFT, BETA_ZERO, LSE_ONLY, EVEN_D,
            DOT_PRECISION, UPCAST, BLOCK_N)
    if LSE_ONLY:  # |A(i)|: the chunk's columns less the anchor's own
        own = rows + SELF_OFFSET
        n_i = (col_hi - col_lo) - ((own >= col_lo) & (own < col_hi)).to(tl.int32)
    if FIXED_SHIFT:
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + shift2

    finished = True
    if SPLIT:
        part = PART + split * M + rows
        stride = splits * M
        tl.store(part, m_i, mask=rmask)
        tl.store(part + stride, l_i, mask=rmask)
        tl.store(part + 2 * stride, tmin_i, mask=rmask)
        tl.store(part + 3 * stride, wl_i, mask=rmask)
        tl.store(part + 4 * stride, ws_i, mask=rmask)
        tl.store(part + 5 * stride, n_i.to(tl.float32), mask=rmask)
        finished = _acquire_last(LOCKS, pid, splits)
        if finished:
            m_i, l_i, tmin_i, wl_i, ws_i, n_i = _merge_chunks(PART, rows, rmask, M, splits,
                                                              beta_tau, BETA_ZERO, BLOCK_M)
    if finished:
        _finish_rows(rows, rmask, m_i, l_i, tmin_i, wl_i, ws_i, n_i, WS, LOSS_ROWS, M, scale,
                     BETA_ZERO, LSE_ONLY)
        if REDUCE > 0:
            if _acquire_last(LOCKS, tl.num_programs(0), tl.num_programs(0)):
                _reduce_loss(WS, LOSS_ROWS, OUT, M, N, SINGLE_SET, REDUCE)
        else:  # no count: the workspace is fully written all the same
            tl.store(_count_ptr(WS, M, N, SINGLE_SET), 0.0, mask=pid == 0)


@triton.jit
def _merge_chunks(PART, rows, rmask, M, splits, beta_tau, BETA_ZERO: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    """The running state of all column chunks merged in chunk order (log-sum-exp style)."""
    stride = splits * M
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    tmin_i = tl.full([BLOCK_M], 1.0e30, tl.float32)
    for s in range(0, splits):
        part = PART + s * M + rows
        m_i = tl.maximum(m_i, tl.load(part, mask=rmask, other=-1.0e30, cache_modifier=".cg"))
        tmin_i = tl.minimum(tmin_i, tl.load(part + 2 * stride, mask=rmask, other=1.0e30,
                                            cache_modifier=".cg"))
    l_i = tl.zeros([BLOCK_M], tl.float32)
    wl_i = tl.zeros([BLOCK_M], tl.float32)
    ws_i = tl.zeros([BLOCK_M], tl.float32)
    n_i = tl.zeros([BLOCK_M], tl.int32)
    for s in range(0, splits):
        part = PART + s * M + rows
        m_s = tl.load(part, mask=rmask, other=-1.0e30, cache_modifier=".cg")
        l_i += tl.load(part + stride, mask=rmask, other=0.0, cache_modifier=".cg") * tl.exp2(m_s - m_i)
        ws = tl.load(part + 4 * stride, mask=rmask, other=0.0, cache_modifier=".cg")
        if BETA_ZERO:
            ws_i += ws
        else:
            tmin_s = tl.load(part + 2 * stride, mask=rmask, other=1.0e30, cache_modifier=".cg")
            alpha = tl.exp2(beta_tau * (tmin_i - tmin_s))
            wl_s = tl.load(part + 3 * stride, mask=rmask, other=0.0, cache_modifier=".cg")
            ws_i += (ws + wl_s * (tmin_s - tmin_i)) * alpha
            wl_i += wl_s * alpha
        n_i += tl.load(part + 5 * stride, mask=rmask, other=0.0, cache_modifier=".cg").to(tl.int32)
    return m_i, l_i, tmin_i, wl_i, ws_i, n_i


@triton.jit
def _finish_rows(rows, rmask, m_i, l_i, tmin_i, wl_i, ws_i, n_i, WS, LOSS_ROWS, M, scale,
                 BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr):
    """Per-anchor loss (times ``scale`` = tau / base_tau) and the statistics the backward reads."""
    valid = n_i > 0
    lse = tl.where(l_i == 0.0, 0.0, (m_i + tl.log2(l_i)) * LN2)  # a NaN feature stays NaN
    lz = tl.zeros_like(lse)
    if LSE_ONLY:
        sbar = tl.zeros_like(lse)
    elif BETA_ZERO:
        sbar = ws_i * LN2 / tl.maximum(n_i, 1).to(tl.float32)
    else:  # SBAR holds sbar - tmin ln 2 here (see _fwd_tile)
        sbar = tl.where(valid, ws_i * LN2 / tl.maximum(wl_i, 1e-30), 0.0)
        lz = tl.where(valid, tl.log2(tl.maximum(wl_i, 1e-30)), 0.0)
        lse = lse - tl.where(valid, tmin_i * LN2, 0.0)  # loss = (LSE - tmin ln 2) - SBAR
    loss = tl.where(valid, lse - sbar, 0.0) * scale
    if not (BETA_ZERO or LSE_ONLY):
        lse = lse + tl.where(valid, tmin_i * LN2, 0.0)
    tl.store(LOSS_ROWS + rows, loss, mask=rmask)
    tl.store(WS + LOSS_ROW * M + rows, loss, mask=rmask)  # the same address unless "none"
    tl.store(WS + LSE_ROW * M + rows, lse, mask=rmask)
    tl.store(WS + SBAR_ROW * M + rows, sbar, mask=rmask)
    tl.store(WS + TMIN_ROW * M + rows, tmin_i, mask=rmask)
    tl.store(WS + LZ_ROW * M + rows, lz, mask=rmask)
    tl.store(WS + NPOS_ROW * M + rows, n_i.to(tl.float32), mask=rmask)


@triton.jit
def _reduce_loss(WS, LOSS_ROWS, OUT, M, N, SINGLE_SET: tl.constexpr, REDUCE: tl.constexpr):
    """Sum (REDUCE 1) or mean over anchors with a positive (2) of the per-anchor losses, in a
    fixed order; the count of those anchors goes to the workspace for the backward."""
    RBLOCK: tl.constexpr = 1024
    total = tl.zeros([RBLOCK], tl.float32)
    count = tl.zeros([RBLOCK], tl.float32)
    for start in range(0, M, RBLOCK):
        idx = start + tl.arange(0, RBLOCK)
        mask = idx < M
        total += tl.load(LOSS_ROWS + idx, mask=mask, other=0.0, cache_modifier=".cg")
        npos = tl.load(WS + NPOS_ROW * M + idx, mask=mask, other=0.0, cache_modifier=".cg")
        count += (npos > 0).to(tl.float32)
    loss = tl.sum(total, axis=0)
    n_valid = tl.sum(count, axis=0)
    if REDUCE == 2:
        loss = loss / tl.maximum(n_valid, 1.0)
    tl.store(OUT, loss)
    tl.store(_count_ptr(WS, M, N, SINGLE_SET), n_valid)


@triton.jit
def _count_ptr(WS, M, N, SINGLE_SET: tl.constexpr):
    if SINGLE_SET:
        return WS + (STAT_ROWS + 1) * M
    else:
        return WS + (STAT_ROWS + 1) * M + N


@triton.jit
def _supcon_norms_kernel(F, G, WS, M, N, D, stride_fm, stride_fd, stride_gn, stride_gd,
                         NORMALIZE: tl.constexpr, SINGLE_SET: tl.constexpr,
                         EVEN_D: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """RF and RG into the workspace (large batches: read by every program instead of
    recomputed per tile)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    RF = WS + STAT_ROWS * M
    mask = rows < M
    f = _load_block(F, rows, mask, offs_d, D, stride_fm, stride_fd, False)
    _, r = _row_scales(f, NORMALIZE, UPCAST)
    tl.store(RF + rows, r, mask=mask)
    if not SINGLE_SET:
        mask = rows < N
        g = _load_block(G, rows, mask, offs_d, D, stride_gn, stride_gd, False)
        _, r = _row_scales(g, NORMALIZE, UPCAST)
        tl.store(RF + M + rows, r, mask=mask)


@triton.jit
def _anchor_weights(idx, mask, WS, GRAD, M, N, grad_scale, SINGLE_SET: tl.constexpr,
                    GRAD_MODE: tl.constexpr):
    """dLoss/dL_i of anchors ``idx`` (0 outside the loss and for padding) and their stats.

    GRAD_MODE 0: per-anchor incoming gradient (reduction "none"); 1: sum; 2: mean (divided
    by the forward's count). ``grad_scale`` is tau / base_tau."""
    npos = tl.load(WS + NPOS_ROW * M + idx, mask=mask, other=0.0)
    if GRAD_MODE == 0:
        gl = tl.load(GRAD + idx, mask=mask, other=0.0).to(tl.float32) * grad_scale
    else:
        gl = tl.load(GRAD).to(tl.float32) * grad_scale + tl.zeros_like(npos)
        if GRAD_MODE == 2:
            gl = gl / tl.maximum(tl.load(_count_ptr(WS, M, N, SINGLE_SET)), 1.0)
    gl = tl.where(npos > 0, gl, 0.0)
    lse2 = tl.load(WS + LSE_ROW * M + idx, mask=mask, other=0.0) * LOG2E
    sbar = tl.load(WS + SBAR_ROW * M + idx, mask=mask, other=0.0)
    tmin = tl.load(WS + TMIN_ROW * M + idx, mask=mask, other=0.0)
    lz = tl.load(WS + LZ_ROW * M + idx, mask=mask, other=0.0)
    return gl, lse2, sbar, tmin, lz, npos


@triton.jit
def _positive_grad(t, gl, sbar, tmin, lz, npos, beta_tau, BETA_ZERO: tl.constexpr,
                   EXACT: tl.constexpr):
    """gl_i w_ij (times 1 - beta tau (s_ij - sbar_i) through the softmax with EXACT), for one
    tile; the anchor statistics come broadcast ((BLOCK, 1) or (1, BLOCK)). Finite everywhere,
    to be selected by the positive mask."""
    if BETA_ZERO:
        return gl / tl.maximum(npos, 1.0) + tl.zeros_like(t)
    else:
        # The recomputed t may differ from the forward's in the last bits (tile orientation,
        # norms); a positive within that of tmin counts as the hardest, or a huge beta would
        # turn an ulp into a weight of 0.
        d = tl.maximum(t - tmin - 4e-6 * tl.maximum(tl.abs(tmin), 1.0), 0.0)
        w = tl.exp2(-beta_tau * d - lz)
        if EXACT:  # s - sbar = (t - tmin) ln 2 - SBAR, SBAR relative to tmin
            w = w * (1.0 - beta_tau * (d * LN2 - sbar))
        return gl * w


@triton.jit
def _bwd_tile(acc, a, ya, a_scale, a_idx, stats_a, B, YB, RB, start, hi, stride_bn, stride_bd,
              offs_d, D, SELF_OFFSET, WS, GRAD, M, N, grad_scale, beta_tau, shift2,
              MASKED: tl.constexpr, ANCHORS_ARE_ROWS: tl.constexpr, SINGLE_SET: tl.constexpr,
              BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, EXACT: tl.constexpr,
              FIXED_SHIFT: tl.constexpr, GRAD_MODE: tl.constexpr, EVEN_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr):
    """One streamed tile of the backward: acc (resident rows, D) += G-tile @ streamed rows.

    ANCHORS_ARE_ROWS: the resident block ``a`` holds anchors and the streamed rows ``B`` are
    contrast rows (dQ; with SINGLE_SET the streamed rows are anchors too, and their terms
    G_ji are read off the same tile). Otherwise ``a`` holds contrast rows and ``B`` anchors
    (dK). The logit tile is always laid out (resident, streamed)."""
    b_idx = start + tl.arange(0, BLOCK_B)
    bmask = (b_idx < hi) | (not MASKED)  # only the last tile can hold padding
    b = _load_block(B, b_idx, bmask, offs_d, D, stride_bn, stride_bd, EVEN_D and not MASKED)
    rb = tl.load(RB + b_idx, mask=bmask, other=0.0)
    yb = tl.load(YB + b_idx, mask=bmask, other=0)
    if ANCHORS_ARE_ROWS:
        t = _logits(a, b, a_scale, rb, a_idx, b_idx, hi, SELF_OFFSET, MASKED, DOT_PRECISION,
                    UPCAST)
    else:  # resident contrast row j is the own column of streamed anchor j - SELF_OFFSET
        t = _logits(a, b, a_scale, rb, a_idx, b_idx, hi, -SELF_OFFSET, MASKED, DOT_PRECISION,
                    UPCAST)
    gl_a, lse2_a, sbar_a, tmin_a, lz_a, npos_a = stats_a
    if ANCHORS_ARE_ROWS:
        gl_r, lse2_r, sbar_r, tmin_r, lz_r, npos_r = (gl_a[:, None], lse2_a[:, None], sbar_a[:, None],
                                                      tmin_a[:, None], lz_a[:, None], npos_a[:, None])
    else:
        gl_b, lse2_b, sbar_b, tmin_b, lz_b, npos_b = _anchor_weights(
            b_idx, bmask, WS, GRAD, M, N, grad_scale, SINGLE_SET, GRAD_MODE)
        gl_r, lse2_r, sbar_r, tmin_r, lz_r, npos_r = (gl_b[None, :], lse2_b[None, :], sbar_b[None, :],
                                                      tmin_b[None, :], lz_b[None, :], npos_b[None, :])
    if SINGLE_SET:
        gl_c, lse2_c, sbar_c, tmin_c, lz_c, npos_c = _anchor_weights(
            b_idx, bmask, WS, GRAD, M, N, grad_scale, SINGLE_SET, GRAD_MODE)
        if FIXED_SHIFT:  # one exponential for both terms: p_ij = 2^(t - shift2) 2^(shift2 - LSE_i)
            e = tl.exp2(t - shift2)
            h = e * (gl_r * tl.exp2(shift2 - lse2_r) + (gl_c * tl.exp2(shift2 - lse2_c))[None, :])
        else:
            h = gl_r * tl.exp2(t - lse2_r) + gl_c[None, :] * tl.exp2(t - lse2_c[None, :])
    else:
        h = gl_r * tl.exp2(t - lse2_r)
    if not LSE_ONLY:
        pos = ya[:, None] == yb[None, :]
        if MASKED:
            pos = pos & (t > float("-inf"))
        w = _positive_grad(t, gl_r, sbar_r, tmin_r, lz_r, npos_r, beta_tau, BETA_ZERO, EXACT)
        if SINGLE_SET:
            w += _positive_grad(t, gl_c[None, :], sbar_c[None, :], tmin_c[None, :], lz_c[None, :],
                                npos_c[None, :], beta_tau, BETA_ZERO, EXACT)
        h = h - tl.where(pos, w, 0.0)
    # acc_r += sum_b h_rb c_b with c_b = b_b RB_b (the normalised streamed row)
    return acc + _dot((h * rb[None, :]).to(b.dtype), b, DOT_PRECISION, UPCAST)


@triton.jit
def _bwd_block(pid, split, splits, X, YX, RX, B, YB, RB, OUT, PART, LOCKS, lock, WS, GRAD,
               M, N, D, X_ROWS, B_ROWS, stride_xn, stride_xd, stride_bn, stride_bd, stride_on,
               stride_od, SELF_OFFSET, inv_tau, beta, shift2, grad_scale, PER_SPLIT,
               ANCHORS_ARE_ROWS: tl.constexpr, SINGLE_SET: tl.constexpr, NORMALIZE: tl.constexpr,
               BETA_ZERO: tl.constexpr, LSE_ONLY: tl.constexpr, EXACT: tl.constexpr,
               FIXED_SHIFT: tl.constexpr, GRAD_MODE: tl.constexpr, SPLIT: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_X: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradient of BLOCK_X resident rows of X (anchors, or contrast rows in the dK part),
    streaming over a chunk of B, then through the normalisation into OUT."""
    lo = split * PER_SPLIT
    hi = tl.maximum(tl.minimum(B_ROWS, lo + PER_SPLIT), lo)
    row0 = pid * BLOCK_X
    idx = row0 + tl.arange(0, BLOCK_X)
    offs_d = tl.arange(0, BLOCK_D)
    xmask = idx < X_ROWS
    x = _load_block(X, idx, xmask, offs_d, D, stride_xn, stride_xd, False)
    p, _ = _row_scales(x, False, UPCAST)
    rx = tl.load(RX + idx, mask=xmask, other=0.0)
    a = _scale_rows(x, p, UPCAST)
    a_scale = rx / p * (inv_tau * LOG2E)
    ya = tl.load(YX + idx, mask=xmask, other=0)
    beta_tau = beta / inv_tau
    if ANCHORS_ARE_ROWS:
        stats = _anchor_weights(idx, xmask, WS, GRAD, M, N, grad_scale, SINGLE_SET, GRAD_MODE)
    else:
        stats = (a_scale, a_scale, a_scale, a_scale, a_scale, a_scale)  # unused
    acc = tl.zeros([BLOCK_X, BLOCK_D], tl.float32)
    full_hi = lo + (hi - lo) // BLOCK_B * BLOCK_B
    if ANCHORS_ARE_ROWS:
        band_lo, band_hi = _band(row0, lo, full_hi, SELF_OFFSET, BLOCK_X, BLOCK_B)
    else:  # streamed anchors i with i + SELF_OFFSET in [row0, row0 + BLOCK_X)
        band_lo, band_hi = _band(row0, lo, full_hi, -SELF_OFFSET, BLOCK_X, BLOCK_B)
    for start in range(lo, band_lo, BLOCK_B):
        acc = _bwd_tile(acc, a, ya, a_scale, idx, stats, B, YB, RB, start, hi, stride_bn,
                        stride_bd, offs_d, D, SELF_OFFSET, WS, GRAD, M, N, grad_scale, beta_tau,
                        shift2, False, ANCHORS_ARE_ROWS, SINGLE_SET, BETA_ZERO, LSE_ONLY, EXACT,
                        FIXED_SHIFT, GRAD_MODE, EVEN_D, DOT_PRECISION, UPCAST, BLOCK_B)
    for start in range(band_lo, band_hi, BLOCK_B):
        acc = _bwd_tile(acc, a, ya, a_scale, idx, stats, B, YB, RB, start, hi, stride_bn,
                        stride_bd, offs_d, D, SELF_OFFSET, WS, GRAD, M, N, grad_scale, beta_tau,
                        shift2, True, ANCHORS_ARE_ROWS, SINGLE_SET, BETA_ZERO, LSE_ONLY, EXACT,
                        FIXED_SHIFT, GRAD_MODE, EVEN_D, DOT_PRECISION, UPCAST, BLOCK_B)
    for start in range(band_hi, full_hi, BLOCK_B):
        acc = _bwd_tile(acc, a, ya, a_scale, idx, stats, B, YB, RB, start, hi, stride_bn,
                        stride_bd, offs_d, D, SELF_OFFSET, WS, GRAD, M, N, grad_scale, beta_tau,
                        shift2, False, ANCHORS_ARE_ROWS, SINGLE_SET, BETA_ZERO, LSE_ONLY, EXACT,
                        FIXED_SHIFT, GRAD_MODE, EVEN_D, DOT_PRECISION, UPCAST, BLOCK_B)
    for start in range(full_hi, hi, BLOCK_B):
        acc = _bwd_tile(acc, a, ya, a_scale, idx, stats, B, YB, RB, start, hi, stride_bn,
                        stride_bd, offs_d, D, SELF_OFFSET, WS, GRAD, M, N, grad_scale, beta_tau,
                        shift2, True, ANCHORS_ARE_ROWS, SINGLE_SET, BETA_ZERO, LSE_ONLY, EXACT,
                        FIXED_SHIFT, GRAD_MODE, EVEN_D, DOT_PRECISION, UPCAST, BLOCK_B)
    dz = acc * inv_tau
    # x again for the normalisation backward (reloaded: keeping the block live through the
    # loop would cost a register per element)
    x = _load_block(X, idx, xmask, offs_d, D, stride_xn, stride_xd, False)

    if SPLIT:
        mask = xmask[:, None] & (offs_d[None, :] < D)
        part = PART + (split * X_ROWS + idx[:, None]) * BLOCK_D + offs_d[None, :]
        tl.store(part, dz, mask=mask)
        if _acquire_last(LOCKS, lock, splits):
            dz = tl.zeros([BLOCK_X, BLOCK_D], tl.float32)
            for s in range(0, splits):
                dz += tl.load(PART + (s * X_ROWS + idx[:, None]) * BLOCK_D + offs_d[None, :],
                              mask=mask, other=0.0, cache_modifier=".cg")
            _store_grad(OUT, idx, xmask, offs_d, D, x, rx, dz, stride_on, stride_od, NORMALIZE)
    else:
        _store_grad(OUT, idx, xmask, offs_d, D, x, rx, dz, stride_on, stride_od, NORMALIZE)


@triton.jit
def _store_grad(OUT, idx, xmask, offs_d, D, x, r, dz, stride_on, stride_od, NORMALIZE: tl.constexpr):
    """dx = r (dz - z (z . dz)) with z = x r; the projection vanishes where ||x|| <= eps
    (r = 1/eps there: max(||x||, eps) is the constant eps)."""
    if NORMALIZE:
        z = x.to(tl.float32) * r[:, None]
        zdz = tl.where(r < 1.0 / NORM_EPS, tl.sum(z * dz, axis=1), 0.0)
        dz = r[:, None] * (dz - zdz[:, None] * z)
    tl.store(OUT + idx[:, None] * stride_on + offs_d[None, :] * stride_od,
             dz.to(OUT.dtype.element_ty), mask=xmask[:, None] & (offs_d[None, :] < D))


@triton.jit
def _supcon_bwd_kernel(
    F, G, YF, YG, WS, GRAD,  # inputs (GRAD: the incoming gradient, read on the device)
    DF, DG,  # outputs
    PART, LOCKS,  # chunk partials (SPLITS, rows, BLOCK_D) float32 and counters, when SPLIT
    M, N, D, stride_fm, stride_fd, stride_gn, stride_gd, stride_dfm, stride_dfd,
    stride_dgn, stride_dgd, SELF_OFFSET, inv_tau, beta, shift2, grad_scale,
    COLS_PER_SPLIT, ROWS_PER_SPLIT, M_BUCKET, N_BUCKET,
    NORMALIZE: tl.constexpr, SINGLE_SET: tl.constexpr, BETA_ZERO: tl.constexpr,
    LSE_ONLY: tl.constexpr, EXACT: tl.constexpr, FIXED_SHIFT: tl.constexpr,
    GRAD_MODE: tl.constexpr, SPLIT: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Every input gradient in one launch, recomputing each logit tile.

    Programs [0, ROW_PROGRAMS): BLOCK_M anchors each, dz_i = sum_j G_ij c_j / tau (dQ); with
    one set G_ji is added from the same tile (t, A and P are symmetric), so this is the whole
    gradient, with no atomics. Two sets: the programs after them take contrast rows,
    dc_j = sum_i G_ij z_i / tau (dK), in the tiles ``supcon_triton.dk_rows`` says."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    RF = WS + STAT_ROWS * M
    if SINGLE_SET:
        _bwd_block(pid, split, splits, F, YF, RF, F, YF, RF, DF, PART, LOCKS, pid, WS, GRAD,
                   M, N, D, M, N, stride_fm, stride_fd, stride_fm, stride_fd, stride_dfm,
                   stride_dfd, SELF_OFFSET, inv_tau, beta, shift2, grad_scale, COLS_PER_SPLIT,
                   True, True, NORMALIZE, BETA_ZERO, LSE_ONLY, EXACT, FIXED_SHIFT, GRAD_MODE,
                   SPLIT, EVEN_D, DOT_PRECISION, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        RG = RF + M
        ROW_PROGRAMS = tl.cdiv(M, BLOCK_M)
        # dK tiles: see supcon_triton.dk_rows
        DK_ROWS: tl.constexpr = BLOCK_N if SPLIT else BLOCK_M
        DK_COLS: tl.constexpr = BLOCK_M if SPLIT else BLOCK_N
        if pid < ROW_PROGRAMS:
            _bwd_block(pid, split, splits, F, YF, RF, G, YG, RG, DF, PART, LOCKS, pid, WS,
                       GRAD, M, N, D, M, N, stride_fm, stride_fd, stride_gn, stride_gd,
                       stride_dfm, stride_dfd, SELF_OFFSET, inv_tau, beta, shift2, grad_scale,
                       COLS_PER_SPLIT, True, False, NORMALIZE, BETA_ZERO, LSE_ONLY, EXACT,
                       FIXED_SHIFT, GRAD_MODE, SPLIT, EVEN_D, DOT_PRECISION, UPCAST, BLOCK_M,
                       BLOCK_N, BLOCK_D)
        else:
            _bwd_block(pid - ROW_PROGRAMS, split, splits, G, YG, RG, F, YF, RF, DG,
                       PART + splits * M * BLOCK_D, LOCKS, pid, WS, GRAD, M, N, D, N, M,
                       stride_gn, stride_gd, stride_fm, stride_fd, stride_dgn, stride_dgd,
                       SELF_OFFSET, inv_tau, beta, shift2, grad_scale, ROWS_PER_SPLIT, False,
                       False, NORMALIZE, BETA_ZERO, LSE_ONLY, EXACT, FIXED_SHIFT, GRAD_MODE,
                       SPLIT, EVEN_D, DOT_PRECISION, UPCAST, DK_ROWS, DK_COLS, BLOCK_D)
