"""Skinny product t = x·aᵀ with Mo-SARA's router and mixture as its epilogue.

Per row (token) of x:

    t      = x·aᵀ                               (r,)   the frozen top-k down projection
    c      = t·gate_in                          ()     Mo-SARA Eq. 6, first factor
    logits = c · gate_out                       (m,)   Eq. 6: a rank-1 router
    g      = softmax(logits)                    (m,)   over the heads, max-subtracted
    s_eff  = g·lambdas                          (r,)   Eq. 5 collapsed: Σ_i g_i Λ_i
    u      = t ⊙ s_eff                          (r,)   what the up projection consumes

Only t (M, r), g (M, m) and u (M, r) are written, all fp32.

Why two loops over the rank. The rank of Mo-SARA is large (k ≈ 800–1000 on 4096-wide
weights), so t does not fit one register tile, and the router needs the full dot product c
before any head weight, hence before any element of u, is known. Each program owns BLOCK_M
rows and walks the rank twice:

1. over rank tiles of width BLOCK_R: accumulate the t tile over K (x·aᵀ), store it, and add
   its share t_tile·gate_in_tile to the per-row scalar c, which lives in registers;
2. the router on (BLOCK_M, m) in registers (logits, max-subtracted exp, normalise), store g;
3. over rank tiles again: read the t tile back (the program's own writes, a few KB, still in
   L1/L2), s_eff_tile = g·lambdas_tile as one small tl.dot with the heads padded to
   BLOCK_H ≥ 16, store u_tile = t_tile ⊙ s_eff_tile.

Extra traffic over a plain x·aᵀ is one read of t, (M, r) fp32, and no (M, out) or (M, m, r)
tensor ever exists. A barrier separates 1 and 3 because the threads that read a t element
back need not be those that stored it.

Parallelism. Steps 1–3 put the whole rank of BLOCK_M rows in one program, so the grid has
only cdiv(M, BLOCK_M) programs. Where that would leave the GPU's SMs idle (M below a few
thousand rows for BLOCK_M = 64 on an H100), the launcher instead computes t with the x_at
kernel, whose grid also splits the rank, and runs this kernel with T_GIVEN: step 1 then only
reads t back to form c. The same choice can be forced with `fuse_t=` (tests cover both).

Backward (_x_at_router_bwd_kernel): given du = dy·b_eff (from the x_at kernel), the router's
backward is again r-sized per row, with the same shape of dependency (the softmax Jacobian
needs dg over the whole rank before dc, hence dt, is known), so it walks the rank twice too:
dg, c, the block's share of dlambdas and u in the first sweep; dz, dc and the block's share of
dgate_out in between; dt and the block's share of dgate_in in the second sweep.
"""
import functools

import torch
import triton
import triton.language as tl

from svk.kernels import _tuning
from svk.kernels._common import (EPILOGUE_PRECISION, INTERPRET, LAUNCHES, adapter_copy_bytes,
                                 as_operand, check_device, configs, dot_precision,
                                 first_if_untuned, m_bucket, prune_by_shared_memory)
from svk.kernels._tiles import indices, x_at_tile
from svk.kernels.x_at import x_at

_EPILOGUE = tl.constexpr(EPILOGUE_PRECISION)

_CONFIGS = configs(
    [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_R": br}, num_warps=w, num_stages=st)
     # sm_90 compiles (python -m svk.kernels.compile_check, r = 1024): none of these spills;
     # (16, 128, 128, 4, 3), (32, 64, 128, 4, 3) and (128, 32, 128, 8, 2) did (8–64 B/thread).
     for bm, bk, br, w, st in [(16, 128, 128, 4, 2), (32, 64, 128, 8, 3), (64, 64, 128, 8, 3),
                               (64, 128, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 128, 8, 2)]],
    # Under the interpreter: BLOCK_R = 16 so that test ranks (5, 37) exercise both a single
    # rank tile and the multi-tile loops.
    {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_R": 16},
)

# Rows per program assumed by the launcher's fuse-or-split rule (the autotuned value may
# differ; the rule only needs the order of magnitude).
_TYPICAL_BLOCK_M = 64


_FITS_SHARED_MEMORY = prune_by_shared_memory(
    lambda a: a["BLOCK_K"] * (a["BLOCK_M"] * a["X"].element_size()
                              + (0 if a["T_GIVEN"] else a["BLOCK_R"] * a["A"].element_size())),
    # Once-only: the converted a tile, and the rank loop's t/u tiles and lambdas tile (fp32)
    # that the second sweep stages through shared memory.
    lambda a: ((0 if a["T_GIVEN"] else adapter_copy_bytes(a))
               + 4 * a["BLOCK_R"] * (2 * a["BLOCK_M"] + a["BLOCK_H"])))


def _capped(configs_, args):
    """Rank tiles no wider than the rank (a 128-wide tile for r = 16 is 8× wasted work, and
    wide tiles are the ones that spill), duplicates removed."""
    widest = max(16, triton.next_power_of_2(args["R"]))
    capped = {}
    for c in configs_:
        kw = dict(c.kwargs, BLOCK_R=min(c.kwargs["BLOCK_R"], widest))
        capped.setdefault(tuple(sorted(kw.items())) + (c.num_warps, c.num_stages),
                          triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return list(capped.values())


def _cap_rank_tile(configs_, args, **kwargs):
    """The backward's pruning: the rank tile capped (SVK_AUTOTUNE=0: the first config)."""
    return first_if_untuned(_capped(configs_, args))


def _prune(configs_, args, **kwargs):
    """The rank tile capped at the rank, then what cannot fit in shared memory dropped."""
    return _FITS_SHARED_MEMORY(_capped(configs_, args), args, **kwargs)


_prune.estimate = _FITS_SHARED_MEMORY.estimate


@_tuning.register
@triton.autotune(configs=_CONFIGS,
                 key=["M_BUCKET", "K", "R", "BLOCK_H", "T_GIVEN", "DOT_PRECISION", "DROPOUT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["SEED"])   # a fresh seed per call must not recompile
def _x_at_router_kernel(
    X, A, GATE_IN, GATE_OUT, LAMBDAS, T, G, U,
    M, K, R, H, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_gi, stride_go, stride_lh, stride_lr,
    stride_tm, stride_tr, stride_gm, stride_gh, stride_um, stride_ur, SEED, P,
    DROPOUT: tl.constexpr, T_GIVEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    rows = indices(pid_m * BLOCK_M, BLOCK_M)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    heads = tl.arange(0, BLOCK_H).to(tl.int64)
    row_ok = rows < M
    head_ok = heads < H

    # 1. t = x·aᵀ tile by tile, and c = t·gate_in accumulated per row.
    c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rank_ok = (r0 + rs) < R
        t_ptrs = T + rows[:, None] * stride_tm + (r0 + rs)[None, :] * stride_tr
        t_mask = row_ok[:, None] & rank_ok[None, :]
        if T_GIVEN:
            t = tl.load(t_ptrs, mask=t_mask, other=0.0)
        else:
            t = x_at_tile(X, A, rows, r0 + rs, M, K, R, stride_xm, stride_xk, stride_ar,
                          stride_ak, SEED, P, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_K,
                          BLOCK_R)
            tl.store(t_ptrs, t, mask=t_mask)
        gate_in = tl.load(GATE_IN + (r0 + rs) * stride_gi, mask=rank_ok,
                          other=0.0).to(tl.float32)
        c += tl.sum(t * gate_in[None, :], axis=1)

    # 2. Mo-SARA Eq. 6: logits = c ⊗ gate_out, softmax over the m heads. Padded heads get
    # -inf so they take no probability mass; subtracting the row maximum keeps exp finite.
    gate_out = tl.load(GATE_OUT + heads * stride_go, mask=head_ok, other=0.0).to(tl.float32)
    logits = c[:, None] * gate_out[None, :]
    logits = tl.where(head_ok[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    g = e / tl.sum(e, axis=1)[:, None]
    tl.store(G + rows[:, None] * stride_gm + heads[None, :] * stride_gh, g,
             mask=row_ok[:, None] & head_ok[None, :])

    if not T_GIVEN:
        # The t tiles stored in step 1 are read back below by other threads of this program.
        tl.debug_barrier()

    # 3. Eq. 5 collapsed: s_eff = g·lambdas, u = t ⊙ s_eff, one rank tile at a time.
    for r0 in range(0, R, BLOCK_R):
        rank_ok = (r0 + rs) < R
        t_mask = row_ok[:, None] & rank_ok[None, :]
        t = tl.load(T + rows[:, None] * stride_tm + (r0 + rs)[None, :] * stride_tr,
                    mask=t_mask, other=0.0)
        lam = tl.load(LAMBDAS + heads[:, None] * stride_lh + (r0 + rs)[None, :] * stride_lr,
                      mask=head_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        s_eff = tl.dot(g, lam, input_precision=_EPILOGUE)
        tl.store(U + rows[:, None] * stride_um + (r0 + rs)[None, :] * stride_ur, t * s_eff,
                 mask=t_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _fuse_t_by_default(x):
    """One launch when its row tiles alone fill the GPU; otherwise x_at's rank-split grid."""
    if INTERPRET or x.device.type != "cuda":
        return True
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return triton.cdiv(x.shape[0], _TYPICAL_BLOCK_M) >= _sm_count(index)


def x_at_router(x, a, gate_in, gate_out, lambdas, *, fuse_t=None, dropout=0.0, seed=0):
    """t = x·aᵀ, g = softmax((t·gate_in) ⊗ gate_out), u = t ⊙ (g·lambdas), all fp32.

    x (M, K) activations (fp32/fp16/bf16); a (R, K); gate_in (R,); gate_out (H,);
    lambdas (H, R); adapter tensors in any float dtype. Returns (t (M, R), g (M, H), u (M, R)).
    fuse_t: compute t inside this kernel (True) or with the x_at kernel first (False);
    None picks by the number of row tiles (see the module docstring).
    dropout, seed: t = dropout(x)·aᵀ, the mask drawn in-kernel from (seed, row, col)
    either way t is computed (_tiles.dropout_kept); 0 = off.
    """
    guard = check_device(x, a=a, gate_in=gate_in, gate_out=gate_out, lambdas=lambdas)
    assert x.dim() == 2 and a.dim() == 2 and lambdas.dim() == 2, "x, a, lambdas must be 2-D"
    M, K = x.shape
    R, H = a.shape[0], lambdas.shape[0]
    assert a.shape[1] == K and tuple(lambdas.shape) == (H, R)
    assert gate_in.shape == (R,) and gate_out.shape == (H,)
    if fuse_t is None:
        fuse_t = _fuse_t_by_default(x)
    if fuse_t:
        a = as_operand(a, x)    # the tl.dot operand in x's dtype once, not per K tile
        t = torch.empty((M, R), device=x.device, dtype=torch.float32)
    else:
        t, _ = x_at(x, a, dropout=dropout, seed=seed)
    g = torch.empty((M, H), device=x.device, dtype=torch.float32)
    u = torch.empty_like(t)
    if M == 0:
        return t, g, u
    # The heads ride on tl.dot's K dimension in step 3, which needs ≥ 16.
    block_h = max(16, triton.next_power_of_2(H))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
    LAUNCHES["x_at_router"] += 1
    with guard:
        _x_at_router_kernel[grid](
            x, a, gate_in, gate_out, lambdas, t, g, u,
            M, K, R, H, m_bucket(M),
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), gate_in.stride(0),
            gate_out.stride(0), lambdas.stride(0), lambdas.stride(1),
            t.stride(0), t.stride(1), g.stride(0), g.stride(1), u.stride(0), u.stride(1),
            seed, float(dropout), DROPOUT=dropout != 0.0 and fuse_t, T_GIVEN=not fuse_t,
            DOT_PRECISION=dot_precision(x.dtype), BLOCK_H=block_h,
        )
    return t, g, u


_BWD_CONFIGS = configs(
    [triton.Config({"BLOCK_R": br}, num_warps=w, num_stages=st)
     # sm_90 compiles at r = 1024 (Triton 3.6 and 3.9): these four do not spill; 128- and
     # 256-wide tiles with two stages spilled 368–776 B/thread, 64-wide on 4 warps 32 B. Its
     # three fp32 products stay "ieee": as tf32x3 they spilled more (224–624 B).
     for br, w, st in [(32, 4, 2), (32, 8, 2), (64, 8, 2), (128, 8, 1)]],
    {"BLOCK_R": 16},
)


@_tuning.register
@triton.autotune(configs=_BWD_CONFIGS,
                 key=["M_BUCKET", "R", "BLOCK_H", "NEED_DT", "WRITE_U", "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _cap_rank_tile})
@triton.jit
def _x_at_router_bwd_kernel(
    DU, T, G, GATE_IN, GATE_OUT, LAMBDAS, DT, U, DLAMBDAS, DGATE_IN, DGATE_OUT,
    M, R, H, M_BUCKET,
    stride_dum, stride_dur, stride_tm, stride_tr, stride_gm, stride_gh, stride_gi, stride_go,
    stride_lh, stride_lr, stride_dtm, stride_dtr, stride_um, stride_ur,
    NEED_DT: tl.constexpr, WRITE_U: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block = pid_m.to(tl.int64)     # the partial-sum buffers are indexed per block
    rows = indices(pid_m * BLOCK_M, BLOCK_M)
    rs = tl.arange(0, BLOCK_R).to(tl.int64)
    heads = tl.arange(0, BLOCK_H).to(tl.int64)
    row_ok = rows < M
    head_ok = heads < H
    # Rows past M and padded heads load as zeros, so they add nothing to any reduction.
    g = tl.load(G + rows[:, None] * stride_gm + heads[None, :] * stride_gh,
                mask=row_ok[:, None] & head_ok[None, :], other=0.0)

    # 1. dg = (du ⊙ t)·lambdasᵀ and c = t·gate_in per row; this block's share of
    #    dlambdas = gᵀ·(du ⊙ t); u = t ⊙ s_eff for the caller's dyᵀ·u.
    c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    dg = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rank_ok = (r0 + rs) < R
        mask = row_ok[:, None] & rank_ok[None, :]
        t = tl.load(T + rows[:, None] * stride_tm + (r0 + rs)[None, :] * stride_tr,
                    mask=mask, other=0.0)
        du = tl.load(DU + rows[:, None] * stride_dum + (r0 + rs)[None, :] * stride_dur,
                     mask=mask, other=0.0)
        lam = tl.load(LAMBDAS + heads[:, None] * stride_lh + (r0 + rs)[None, :] * stride_lr,
                      mask=head_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        gate_in = tl.load(GATE_IN + (r0 + rs) * stride_gi, mask=rank_ok,
                          other=0.0).to(tl.float32)
        c += tl.sum(t * gate_in[None, :], axis=1)
        ds_eff = du * t
        dg = tl.dot(ds_eff, tl.trans(lam), dg, input_precision="ieee")
        dlam = tl.dot(tl.trans(g), ds_eff, input_precision="ieee")
        tl.store(DLAMBDAS + block * H * R + heads[:, None] * R + (r0 + rs)[None, :], dlam,
                 mask=head_ok[:, None] & rank_ok[None, :])
        if WRITE_U:
            s_eff = tl.dot(g, lam, input_precision="ieee")
            tl.store(U + rows[:, None] * stride_um + (r0 + rs)[None, :] * stride_ur,
                     (t * s_eff).to(U.dtype.element_ty), mask=mask)

    # 2. Softmax Jacobian row by row, then back through logits = c ⊗ gate_out.
    dz = g * (dg - tl.sum(g * dg, axis=1)[:, None])
    gate_out = tl.load(GATE_OUT + heads * stride_go, mask=head_ok, other=0.0).to(tl.float32)
    tl.store(DGATE_OUT + block * H + heads, tl.sum(dz * c[:, None], axis=0), mask=head_ok)
    dc = tl.sum(dz * gate_out[None, :], axis=1)

    # 3. dt = du ⊙ s_eff + dc ⊗ gate_in, and this block's share of dgate_in = tᵀ·dc.
    for r0 in range(0, R, BLOCK_R):
        rank_ok = (r0 + rs) < R
        mask = row_ok[:, None] & rank_ok[None, :]
        t = tl.load(T + rows[:, None] * stride_tm + (r0 + rs)[None, :] * stride_tr,
                    mask=mask, other=0.0)
        gate_in = tl.load(GATE_IN + (r0 + rs) * stride_gi, mask=rank_ok,
                          other=0.0).to(tl.float32)
        tl.store(DGATE_IN + block * R + (r0 + rs), tl.sum(t * dc[:, None], axis=0), mask=rank_ok)
        if NEED_DT:
            du = tl.load(DU + rows[:, None] * stride_dum + (r0 + rs)[None, :] * stride_dur,
                         mask=mask, other=0.0)
            lam = tl.load(LAMBDAS + heads[:, None] * stride_lh + (r0 + rs)[None, :] * stride_lr,
                          mask=head_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
            s_eff = tl.dot(g, lam, input_precision="ieee")
            dt = du * s_eff + dc[:, None] * gate_in[None, :]
            tl.store(DT + rows[:, None] * stride_dtm + (r0 + rs)[None, :] * stride_dtr, dt,
                     mask=mask)


def x_at_router_backward(du, t, g, gate_in, gate_out, lambdas, *, need_dt=True,
                         u_dtype=None):
    """The router's backward from du = dy·b_eff (see svk.ops.sv_mixture_linear._backward):

    returns (dt, u, dlambdas, dgate_in, dgate_out) with dt = du ⊙ s_eff + dc ⊗ gate_in (M, R)
    fp32 or None when not need_dt; u = t ⊙ s_eff (M, R) in u_dtype, or None when u_dtype is
    None; dlambdas (H, R), dgate_in (R,), dgate_out (H,) in fp32.

    One program per BLOCK_M rows walks the rank twice (dg needs the whole rank before the
    softmax Jacobian gives dc, and dt needs dc): t and du are read twice, dt and u written
    once — against a dozen (M, R) passes for the same formulas as separate PyTorch ops. The
    reductions over M are per-block partial sums (deterministic, no atomics), added up here.
    """
    guard = check_device(du, t=t, g=g, gate_in=gate_in, gate_out=gate_out, lambdas=lambdas)
    M, R = t.shape
    H = g.shape[1]
    # Fixed rows per program, so the partial-sum buffers can be sized before the launch.
    # 32 rows give an H100 over a hundred programs from M ≈ 4k (this kernel is memory-bound).
    block_m = 16 if INTERPRET else 32
    block_h = max(16, triton.next_power_of_2(H))
    n_blocks = triton.cdiv(M, block_m)
    dlambdas = torch.empty((n_blocks, H, R), device=t.device, dtype=torch.float32)
    dgate_in = torch.empty((n_blocks, R), device=t.device, dtype=torch.float32)
    dgate_out = torch.empty((n_blocks, H), device=t.device, dtype=torch.float32)
    dt = torch.empty_like(t) if need_dt else None
    u = torch.empty((M, R), device=t.device, dtype=u_dtype) if u_dtype is not None else None
    LAUNCHES["x_at_router_bwd"] += 1
    with guard:
        _x_at_router_bwd_kernel[(n_blocks,)](
            du, t, g, gate_in, gate_out, lambdas, dt if need_dt else t,
            u if u is not None else t, dlambdas, dgate_in, dgate_out,
            M, R, H, m_bucket(M),
            du.stride(0), du.stride(1), t.stride(0), t.stride(1), g.stride(0), g.stride(1),
            gate_in.stride(0), gate_out.stride(0), lambdas.stride(0), lambdas.stride(1),
            dt.stride(0) if need_dt else 0, dt.stride(1) if need_dt else 0,
            u.stride(0) if u is not None else 0, u.stride(1) if u is not None else 0,
            NEED_DT=need_dt, WRITE_U=u is not None, BLOCK_M=block_m, BLOCK_H=block_h,
        )
    return dt, u, dlambdas.sum(0), dgate_in.sum(0), dgate_out.sum(0)
