"""Triton kernels for the Sessa feedback solve (SESSA.md §5); launchers live in triton_chunk.py.

The feedback branch is one attention head of width K = D (1024..4096), far wider than the <= 256 that
flash-attention keeps in registers. So the T x T work is organised as GEMMs over *panels*: L rows
(or L columns) of the probability matrix P against all T positions, materialised in an [L, T] fp32
buffer (memory linear in T), and only the small C x C diagonal blocks of the triangular solve are
done one after another (block substitution), each applied as the product series
(I + A)(I + A^2)...(I + A^(C/2)) of dense tl.dots, with no row-by-row substitution.
Kernels (prefixes: i_ program ids, o_ offsets, m_ masks, b_ blocks):

  feedback_lse_kernel        row log-sum-exp of the strict-causal logits, flash style, per segment of
                             keys (parallel over row tiles x key segments; merged by the launcher).
  feedback_probs_kernel      P[t, j] = exp(q_t . k_j * scale - lse_t) (j < t), or B[t, j] = gamma_t P[t, j],
                             for a rectangle of (t, j), into a panel buffer in row or column layout.
  feedback_dlogits_kernel    in place on a row panel: P -> dL/dlogits = gamma_t P (lam_t . s_j - delta_t) * scale.
  panel_matmul_kernel        C (+)= A @ X for strided A: every other T x T contraction.
  feedback_solve_fwd_kernel  block forward substitution inside one row panel, diagonal block by block.
  feedback_solve_bwd_kernel  the transposed block substitution inside one column panel, in reverse.

Document boundaries (HAS_DOCS, constexpr): `starts` [B, T] int32 holds the first position of each
row's document; row t sees keys starts[t] <= j < t. Only the kernels that produce P mask (lse, probs)
or skip tiles of zeros (dlogits); the panel GEMMs (DOCS) only shorten their reduction to skip blocks
of zeros; the solves read the zeros. Without documents the
launchers pass an unread stand-in pointer and HAS_DOCS=False compiles the unmasked kernels.

Panel offsets and extents are `do_not_specialize`: one compiled variant serves every panel.

Dtypes: inputs may be fp32, bf16, fp16 or fp64. Every operand is cast to the compute dtype of the
output/work buffer (fp32, or fp64 for fp64 inputs) before `tl.dot` (the solve must run in fp32),
except q and k in the logits dots (lse, probs) when QK_NATIVE: bf16/fp16 q, k on the GPU go to
`tl.dot` as loaded, with fp32 accumulation (the same exact products at the half-precision MMA rate,
twice tf32's); the interpreter's bf16 `tl.dot` is wrong, so there the launcher casts. The launcher
picks `DOT_PRECISION` ("tf32" for half inputs, exact for the bf16-valued q/k loads; "tf32x3" for
fp32; "ieee" for fp64) and `SOLVE_PRECISION` ("ieee") for the diagonal inverse. Sizes that are not
powers of two (T, K, V) are masked; tile sizes are constexprs.
"""
import triton
import triton.language as tl


@triton.jit
def feedback_lse_kernel(
    q, k, starts, part, T, K, scale,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, SEG: tl.constexpr, DOT_PRECISION: tl.constexpr,
    QK_NATIVE: tl.constexpr, HAS_DOCS: tl.constexpr,
):
    """Partial row log-sum-exp over one segment of keys. Grid (cdiv(T, BT), segments, B).

    part[b, g, t] = logsumexp_{j in segment g, j < t} q_t . k_j * scale, segment g = keys
    [g * SEG, (g + 1) * SEG) (SEG a multiple of BS); -inf where the row sees no key of the segment.
    The launcher merges the segments (logsumexp over g; 0 for a row with no key at all): splitting
    the keys balances the triangular work (the last row tile would otherwise walk all T / BS key
    tiles alone) and fills the GPU at T / BT < SMs.
    HAS_DOCS: keys j < starts[b, t] (other documents) are left out too, and the key loop begins at
    the tile of the first row's document start (documents are contiguous, starts non-decreasing).
    QK_NATIVE: q, k are bf16/fp16 and go to tl.dot as loaded (fp32 accumulation: the same products);
    else they are cast to the accumulator dtype first (the interpreter's bf16 dot is wrong).
    """
    i_t, i_g, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q += i_b.to(tl.int64) * T * K
    k += i_b.to(tl.int64) * T * K
    part += (i_b.to(tl.int64) * tl.num_programs(1) + i_g) * T
    ACC = part.dtype.element_ty

    o_t = i_t * BT + tl.arange(0, BT)
    m_t = o_t < T
    b_m = tl.full([BT], float("-inf"), dtype=ACC)  # running max
    b_z = tl.zeros([BT], dtype=ACC)  # running sum of exp(logit - max)
    i_s0 = i_g * (SEG // BS)
    if HAS_DOCS:
        starts += i_b.to(tl.int64) * T
        b_start = tl.load(starts + o_t, mask=m_t, other=0)
        i_s0 = tl.maximum(i_s0, tl.load(starts + i_t * BT) // BS)  # no row of the tile sees a key before this
    # Keys j < t <= (i_t + 1) * BT - 1: the segment's key tiles up to the diagonal.
    i_s1 = tl.minimum(tl.cdiv(tl.minimum(T, (i_t + 1) * BT), BS), (i_g + 1) * (SEG // BS))
    for i_s in range(i_s0, i_s1):
        o_s = i_s * BS + tl.arange(0, BS)
        m_s = o_s < T
        b_l = tl.zeros([BT, BS], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            b_kt = tl.load(k + o_s[None, :] * K + o_k[:, None], mask=m_s[None, :] & m_k[:, None], other=0)
            if not QK_NATIVE:
                b_q = b_q.to(ACC)
                b_kt = b_kt.to(ACC)
            b_l += tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)  # [BT, BK] @ [BK, BS]
        m_l = (o_s[None, :] < o_t[:, None]) & m_s[None, :]
        if HAS_DOCS:
            m_l = m_l & (o_s[None, :] >= b_start[:, None])
        b_l = tl.where(m_l, b_l * scale, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_l, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # rows with no key yet
        b_z = b_z * tl.exp(b_m - b_m_safe) + tl.sum(tl.exp(b_l - b_m_safe[:, None]), 1)
        b_m = b_m_new
    b_lse = tl.where(b_z > 0, b_m + tl.log(tl.where(b_z > 0, b_z, 1.0)), float("-inf"))
    tl.store(part + o_t, b_lse.to(ACC), mask=m_t)


@triton.jit(do_not_specialize=["t0", "t1", "j0", "j1", "p_t0", "p_j0"])
def feedback_probs_kernel(
    q, k, lse, gamma, starts, p, T, K, scale,
    t0, t1, j0, j1,  # the rectangle of queries [t0, t1) x keys [j0, j1) to fill
    p_t0, p_j0, s_pb, s_pt, s_pj,  # p[b, t, j] lives at p + b*s_pb + (t - p_t0)*s_pt + (j - p_j0)*s_pj
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr, TIMES_GAMMA: tl.constexpr,
    QK_NATIVE: tl.constexpr, HAS_DOCS: tl.constexpr,
):
    """Strict-causal probabilities P[t, j] for one [BM, BN] tile, 0 where j >= t. Grid (rows, cols, B).

    With TIMES_GAMMA the tile holds B[t, j] = gamma_t P[t, j], the system matrix (backward column panels).
    QK_NATIVE as in feedback_lse_kernel.
    With HAS_DOCS also 0 where j < starts[b, t] (another document); a tile whose keys all precede
    its first row's document start stores zeros without computing.
    """
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q += i_b.to(tl.int64) * T * K
    k += i_b.to(tl.int64) * T * K
    lse += i_b.to(tl.int64) * T
    p += i_b.to(tl.int64) * s_pb
    ACC = p.dtype.element_ty

    o_t = t0 + i_m * BM + tl.arange(0, BM)
    o_j = j0 + i_n * BN + tl.arange(0, BN)
    m_t = o_t < t1
    m_j = o_j < j1
    p_p = p + (o_t[:, None] - p_t0) * s_pt + (o_j[None, :] - p_j0) * s_pj
    m_p = m_t[:, None] & m_j[None, :]
    no_past = j0 + i_n * BN >= t0 + i_m * BM + BM - 1
    if HAS_DOCS:
        starts += i_b.to(tl.int64) * T
        b_start = tl.load(starts + o_t, mask=m_t, other=0)
        no_past = no_past | (j0 + i_n * BN + BN <= tl.load(starts + t0 + i_m * BM))
    if no_past:
        # The whole tile is on or above the diagonal (j >= t), or before the rows' documents: store zeros.
        tl.store(p_p, tl.zeros([BM, BN], dtype=ACC), mask=m_p)
    else:
        b_l = tl.zeros([BM, BN], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0)
            b_kt = tl.load(k + o_j[None, :] * K + o_k[:, None], mask=m_j[None, :] & m_k[:, None], other=0)
            if not QK_NATIVE:  # see feedback_lse_kernel
                b_q = b_q.to(ACC)
                b_kt = b_kt.to(ACC)
            b_l += tl.dot(b_q, b_kt, input_precision=DOT_PRECISION)  # [BM, BK] @ [BK, BN]
        b_lse = tl.load(lse + o_t, mask=m_t, other=0).to(ACC)
        b_p = tl.exp(b_l * scale - b_lse[:, None])
        if TIMES_GAMMA:
            b_p *= tl.load(gamma + i_b.to(tl.int64) * T + o_t, mask=m_t, other=0).to(ACC)[:, None]
        m_visible = (o_j[None, :] < o_t[:, None]) & m_p
        if HAS_DOCS:
            m_visible = m_visible & (o_j[None, :] >= b_start[:, None])
        b_p = tl.where(m_visible, b_p, 0.0)
        tl.store(p_p, b_p, mask=m_p)


@triton.jit(do_not_specialize=["t0", "t1", "j1"])
def feedback_dlogits_kernel(
    p, lam, s, gamma, delta, starts, T, V, scale,
    t0, t1, j1, s_pb,  # row panel: p[b, t - t0, j] with row stride s_pt = T, keys [0, j1)
    BM: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr,
):
    """In place: P[t, j] -> gamma_t P[t, j] (lam_t . s_j - delta_t) * scale. Grid (rows, cols, B).

    lam, s: [B, T, V] (compute dtype, and s's dtype); gamma [B, T]; delta [B, T] (= lam_t . u_t).
    HAS_DOCS: tiles whose keys all precede the first row's document start (P = 0) are skipped.
    """
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if i_n * BN >= t0 + i_m * BM + BM - 1:
        return  # tile entirely at j >= t: P = 0, so dlogits = 0 (already there)
    if HAS_DOCS:
        if i_n * BN + BN <= tl.load(starts + i_b.to(tl.int64) * T + t0 + i_m * BM):
            return  # tile entirely in earlier documents: P = 0 there too
    p += i_b.to(tl.int64) * s_pb
    lam += i_b.to(tl.int64) * T * V
    s += i_b.to(tl.int64) * T * V
    gamma += i_b.to(tl.int64) * T
    delta += i_b.to(tl.int64) * T
    ACC = p.dtype.element_ty

    o_t = t0 + i_m * BM + tl.arange(0, BM)
    o_j = i_n * BN + tl.arange(0, BN)
    m_t = o_t < t1
    m_j = o_j < j1
    b_dp = tl.zeros([BM, BN], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_lam = tl.load(lam + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        b_st = tl.load(s + o_j[None, :] * V + o_v[:, None], mask=m_j[None, :] & m_v[:, None], other=0).to(ACC)
        b_dp += tl.dot(b_lam, b_st, input_precision=DOT_PRECISION)  # [BM, BV] @ [BV, BN]
    p_p = p + (o_t[:, None] - t0) * T + o_j[None, :]
    m_p = m_t[:, None] & m_j[None, :]
    b_p = tl.load(p_p, mask=m_p, other=0)
    b_g = tl.load(gamma + o_t, mask=m_t, other=0).to(ACC)
    b_d = tl.load(delta + o_t, mask=m_t, other=0).to(ACC)
    b_ds = b_g[:, None] * b_p * (b_dp - b_d[:, None]) * scale
    tl.store(p_p, b_ds, mask=m_p)


@triton.jit(do_not_specialize=["M", "J", "row0", "red0"])
def panel_matmul_kernel(
    a, x, c, docs, M, N, J, row0, red0,
    s_ab, s_am, s_aj, s_xb, s_xj, s_cb, s_cm, s_db,
    BM: tl.constexpr, BN: tl.constexpr, BJ: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOCS: tl.constexpr,
):
    """c[b, m, n] (+)= sum_{j<J} a[b, m, j] * x[b, j, n]. Grid (cdiv(M, BM), cdiv(N, BN), B).

    a is strided (a transposed panel is s_am = 1); x and c have unit stride along n.
    With document boundaries, `a` is a panel of P (or of dL/dlogits) that is 0 outside documents,
    and the reduction skips the j-blocks that are zero for the whole row tile:
      DOCS = 1: rows are queries t = row0 + m, j is the key red0 + j; docs = starts [B, T]
                (a[m, j] = 0 for keys before starts[t]): j begins at the block of the first row's start.
      DOCS = 2: rows are keys row0 + m, j is the query red0 + j; docs = document ends [B, T]
                (first position after the key's document): j stops at the last row's end.
    """
    i_m, i_n, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_j0 = 0
    i_j1 = tl.cdiv(J, BJ)
    if DOCS == 1:
        first_start = tl.load(docs + i_b.to(tl.int64) * s_db + row0 + i_m * BM)
        i_j0 = tl.maximum(first_start - red0, 0) // BJ
    if DOCS == 2:
        last_end = tl.load(docs + i_b.to(tl.int64) * s_db + row0 + tl.minimum(i_m * BM + BM, M) - 1)
        i_j1 = tl.cdiv(tl.minimum(tl.maximum(last_end - red0, 0), J), BJ)
    a += i_b.to(tl.int64) * s_ab
    x += i_b.to(tl.int64) * s_xb
    c += i_b.to(tl.int64) * s_cb
    ACC = c.dtype.element_ty

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    b_c = tl.zeros([BM, BN], dtype=ACC)
    for i_j in range(i_j0, i_j1):
        o_j = i_j * BJ + tl.arange(0, BJ)
        m_j = o_j < J
        b_a = tl.load(a + o_m[:, None] * s_am + o_j[None, :] * s_aj, mask=m_m[:, None] & m_j[None, :], other=0).to(ACC)
        b_x = tl.load(x + o_j[:, None] * s_xj + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0).to(ACC)
        b_c += tl.dot(b_a, b_x, input_precision=DOT_PRECISION)  # [BM, BJ] @ [BJ, BN]
    p_c = c + o_m[:, None] * s_cm + o_n[None, :]
    m_c = m_m[:, None] & m_n[None, :]
    if ACCUMULATE:
        b_c += tl.load(p_c, mask=m_c, other=0)
    tl.store(p_c, b_c, mask=m_c)


@triton.jit(do_not_specialize=["r0", "r1"])
def feedback_solve_fwd_kernel(
    p, ctx, f, gamma, s, T, V, r0, r1, s_pb, s_cb,
    BC: tl.constexpr, BJ: tl.constexpr, BV: tl.constexpr, LOG2_BC: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOLVE_PRECISION: tl.constexpr,
):
    """Rows [r0, r1) of s = f + gamma * (P @ s), chunk by chunk. Grid (cdiv(V, BV), B).

    p: row panel, p[b, t - r0, j] (row stride T), P of rows [r0, r1) against keys [0, r1).
    ctx: [B, L, V] sum_{j<r0} P[t, j] s[j] for the panel's rows (read if HAS_CONTEXT).
    s: [B, T, V] output; rows < r0 already solved. For chunk c with A = diag(gamma_c) P[c, c]:
        s_c = (I - A)^-1 (f_c + gamma_c * (ctx_c + sum_{r0 <= c' < c} P[c, c'] s_c'))
    and A is nilpotent (strictly lower, A^BC = 0), so (I - A)^-1 = (I + A)(I + A^2)(I + A^4)...
    (I + A^(BC/2)): LOG2_BC register matmuls and squarings replace the row-by-row substitution
    (SOLVE_PRECISION). The in-panel past is summed in steps of BJ rows (DOT_PRECISION).
    """
    i_v, i_b = tl.program_id(0), tl.program_id(1)
    p += i_b.to(tl.int64) * s_pb
    ctx += i_b.to(tl.int64) * s_cb
    f += i_b.to(tl.int64) * T * V
    s += i_b.to(tl.int64) * T * V
    gamma += i_b.to(tl.int64) * T
    ACC = s.dtype.element_ty

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BC)
    for i_c in range(0, tl.cdiv(r1 - r0, BC)):
        o_c = r0 + i_c * BC + o_i
        m_c = o_c < r1
        m_cv = m_c[:, None] & m_v[None, :]
        b_acc = tl.zeros([BC, BV], dtype=ACC)
        if HAS_CONTEXT:
            b_acc += tl.load(ctx + (o_c[:, None] - r0) * V + o_v[None, :], mask=m_cv, other=0)
        c_start = r0 + i_c * BC
        for j_start in range(r0, c_start, BJ):  # solved rows of this panel: [r0, c_start)
            o_j = j_start + tl.arange(0, BJ)
            m_j = o_j < c_start
            b_p = tl.load(p + (o_c[:, None] - r0) * T + o_j[None, :], mask=m_c[:, None] & m_j[None, :], other=0)
            b_s = tl.load(s + o_j[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
            b_acc += tl.dot(b_p, b_s, input_precision=DOT_PRECISION)  # [BC, BJ] @ [BJ, BV]
        b_g = tl.load(gamma + o_c, mask=m_c, other=0).to(ACC)
        b_x = tl.load(f + o_c[:, None] * V + o_v[None, :], mask=m_cv, other=0).to(ACC) + b_g[:, None] * b_acc
        b_a = b_g[:, None] * tl.load(p + (o_c[:, None] - r0) * T + o_c[None, :], mask=m_c[:, None] & m_c[None, :], other=0)
        for i in tl.static_range(LOG2_BC):
            b_x += tl.dot(b_a, b_x, input_precision=SOLVE_PRECISION)  # [BC, BC] @ [BC, BV]
            if i < LOG2_BC - 1:
                b_a = tl.dot(b_a, b_a, input_precision=SOLVE_PRECISION)  # [BC, BC] @ [BC, BC]
        tl.store(s + o_c[:, None] * V + o_v[None, :], b_x.to(s.dtype.element_ty), mask=m_cv)
        tl.debug_barrier()  # the next chunks read these rows of s back from global memory


@triton.jit(do_not_specialize=["c0", "c1"])
def feedback_solve_bwd_kernel(
    bt, ctx, grad_s, lam, T, V, c0, c1, s_pb, s_cb,
    BC: tl.constexpr, BJ: tl.constexpr, BV: tl.constexpr, LOG2_BC: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOLVE_PRECISION: tl.constexpr,
):
    """Rows [c0, c1) of lam = grad_s + B^T lam, B = diag(gamma) P, in reverse chunk order. Grid (cdiv(V, BV), B).

    bt: column panel of the system matrix, bt[b, j - c0, t] = B[t, j] = gamma_t P[t, j] (row stride T)
        for keys j in [c0, c1), queries t >= c0.
    ctx: [B, L, V] sum_{t >= c1} B[t, j] lam_t for the panel's j (read if HAS_CONTEXT).
    lam: [B, T, V] output; rows >= c1 already solved. For chunk c, with A^T = B[c, c]^T strictly upper:
        lam_c = (I - A^T)^-1 (grad_s_c + ctx_c + sum_{c < c' in panel} B[c', c]^T lam_c')
    """
    i_v, i_b = tl.program_id(0), tl.program_id(1)
    bt += i_b.to(tl.int64) * s_pb
    ctx += i_b.to(tl.int64) * s_cb
    grad_s += i_b.to(tl.int64) * T * V
    lam += i_b.to(tl.int64) * T * V
    ACC = lam.dtype.element_ty

    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_i = tl.arange(0, BC)
    n_c = tl.cdiv(c1 - c0, BC)
    for i_r in range(0, n_c):
        i_c = n_c - 1 - i_r
        o_c = c0 + i_c * BC + o_i
        m_c = o_c < c1
        m_cv = m_c[:, None] & m_v[None, :]
        b_acc = tl.zeros([BC, BV], dtype=ACC)
        if HAS_CONTEXT:
            b_acc += tl.load(ctx + (o_c[:, None] - c0) * V + o_v[None, :], mask=m_cv, other=0)
        for j_start in range(c0 + (i_c + 1) * BC, c1, BJ):  # solved rows of this panel after the chunk
            o_j = j_start + tl.arange(0, BJ)
            m_j = o_j < c1
            b_bt = tl.load(bt + (o_c[:, None] - c0) * T + o_j[None, :], mask=m_c[:, None] & m_j[None, :], other=0)
            b_l = tl.load(lam + o_j[:, None] * V + o_v[None, :], mask=m_j[:, None] & m_v[None, :], other=0)
            b_acc += tl.dot(b_bt, b_l, input_precision=DOT_PRECISION)  # [BC, BJ] @ [BJ, BV]
        b_x = tl.load(grad_s + o_c[:, None] * V + o_v[None, :], mask=m_cv, other=0).to(ACC) + b_acc
        b_at = tl.load(bt + (o_c[:, None] - c0) * T + o_c[None, :], mask=m_c[:, None] & m_c[None, :], other=0)
        for i in tl.static_range(LOG2_BC):
            b_x += tl.dot(b_at, b_x, input_precision=SOLVE_PRECISION)  # [BC, BC] @ [BC, BV]
            if i < LOG2_BC - 1:
                b_at = tl.dot(b_at, b_at, input_precision=SOLVE_PRECISION)  # [BC, BC] @ [BC, BC]
        tl.store(lam + o_c[:, None] * V + o_v[None, :], b_x.to(lam.dtype.element_ty), mask=m_cv)
        tl.debug_barrier()  # earlier chunks read these rows of lam back from global memory
