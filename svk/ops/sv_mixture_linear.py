"""svk.sv_mixture_linear: Mo-SARA's gated mixture of singular values on a frozen layer, fused.

    t      = x·aᵀ                                  (M, r)   a = Vh[:k], frozen
    c      = t·gate_in                             (M,)
    g      = softmax(c ⊗ gate_out)                 (M, m)   Mo-SARA Eq. 6, a rank-1 router
    s_eff  = g·lambdas                             (M, r)   lambdas (m, r): one Λ_i per head
    u      = t ⊙ s_eff                             (M, r)
    y      = x·Wᵀ + bias + u·b_effᵀ,   b_eff = scaling · out_scale ⊙ b   (out, r)

Mo-SARA's Eq. 5 sums m per-head products g_i ⊙ (t·Λ_i·bᵀ), each (M, out). Since Λ_i is
diagonal and g_i a per-row scalar, Σ_i g_i (t ⊙ λ_i)·bᵀ = (t ⊙ Σ_i g_i λ_i)·bᵀ = u·bᵀ: the
mixture collapses to per-token effective singular values s_eff before the single up
projection, so the layer costs one skinny product, an r-sized router and one rank-r term
folded into the base GEMM — never an (M, out) intermediate, whatever m is.

Strategies. "torch" is the PyTorch formula with the same memory behaviour (CPU, float64,
gradcheck). On the Triton backend there is one strategy, "fused": x_at_router (t, g and u in
one kernel, see svk/kernels/x_at_router.py) then xw_plus_ub (base GEMM plus u·b_effᵀ).
"merged" cannot exist here: the update W + b_eff·diag(s_eff)·a depends on the token through
s_eff, so there is no single W_eff to fold. "one_pass" would recompute t and the router in
every N-tile of the GEMM with the whole rank in registers; at Mo-SARA's ranks (k ≈ 1000) that
does not fit, so it is not implemented. Both names (from SVK_STRATEGY) map to "fused".
"""
import torch
import torch.nn.functional as F

from svk.ops import _checks, _dispatch
from svk.ops._common import acc_dtype as _acc_dtype
from svk.ops._common import (add_up_projection, cast, down_projection_rank, draw_seed,
                             dropout_keep, input_side_grads)
from svk.ops._common import b_eff as _b_eff
from svk.ops._common import up_projection_grad
from svk.ops._library import differentiable_op

_ARGS = ("x", "weight", "a", "lambdas", "gate_in", "gate_out", "b", "bias", "out_scale")


def _router(t, gate_in, gate_out, lambdas):
    """(g, u) from t in t's dtype: Mo-SARA Eq. 6, then Eq. 5 collapsed to u = t ⊙ (g·lambdas)."""
    c = t @ gate_in.to(t.dtype)
    g = torch.softmax(c[:, None] * gate_out.to(t.dtype), dim=-1)
    return g, t * (g @ lambdas.to(t.dtype))


def _router_backward(du, t, g, gate_in, gate_out, lambdas):
    """(dt, dlambdas, dgate_in, dgate_out) from du = dy·b_eff, in t's dtype; the formulas of
    _backward as PyTorch ops on (M, r) and (M, m) tensors (x_at_router_backward fuses them)."""
    lam, gi = lambdas.to(t.dtype), gate_in.to(t.dtype)
    ds_eff = du * t
    dg = ds_eff @ lam.t()
    dz = g * (dg - (g * dg).sum(-1, keepdim=True))
    dc = dz @ gate_out.to(t.dtype)
    dt = torch.addcmul(du * (g @ lam), dc[:, None], gi[None, :])
    return dt, g.t() @ ds_eff, t.t() @ dc, dz.t() @ (t @ gi)


def _forward(x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale, scaling, dropout,
             seed, strategy):
    """Returns (y, t, g): y in x's dtype; t (M, r) and g (M, m) in fp32 (fp64 for fp64 x).
    With dropout > 0, t = dropout(x)·aᵀ (mask from `seed`); the base GEMM reads x."""
    if strategy == "torch":
        xa = x if dropout == 0.0 else x * dropout_keep(x.shape, x, dropout, seed)
        t = cast(F.linear(xa, cast(a, x.dtype)), _acc_dtype(x))
        g, u = _router(t, gate_in, gate_out, lambdas)
        return add_up_projection(F.linear(x, weight, bias), u, b, out_scale, scaling), t, g
    b_eff = _b_eff(b, out_scale, scaling, _acc_dtype(x))
    from svk.kernels import xw_plus_ub
    from svk.kernels.x_at_router import x_at_router
    # The mask falls on x·aᵀ only (drawn in-kernel); the base GEMM reads x.
    t, g, u = x_at_router(x, a, gate_in, gate_out, lambdas, dropout=dropout, seed=seed)
    return xw_plus_ub(x, weight, u, b_eff, bias), t, g


def _backward(dy, x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale, t, g, scaling,
              dropout, seed, strategy, needs):
    """Gradients of (x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale).

    With b_eff = scaling·out_scale ⊙ b, c = t·gate_in, z = c ⊗ gate_out, g = softmax(z),
    s_eff = g·lambdas, u = t ⊙ s_eff and y = x·Wᵀ + bias + u·b_effᵀ:

      du        = dy·b_eff                               (M, r)  one skinny pass over dy
      ds_eff    = du ⊙ t ;  dt = du ⊙ s_eff              (u = t ⊙ s_eff)
      dlambdas  = gᵀ·ds_eff                              (m, r)  (s_eff = g·lambdas)
      dg        = ds_eff·lambdasᵀ                        (M, m)
      dz        = g ⊙ (dg − Σ_heads g ⊙ dg)              softmax Jacobian, row by row
      dgate_out = dzᵀ·c                                  (z = c ⊗ gate_out)
      dc        = dz·gate_out                            (M,)
      dgate_in  = tᵀ·dc ;  dt += dc ⊗ gate_in            (c = t·gate_in)
      dx        = dy·W + dt·a                            one GEMM-plus-r kernel
      da        = dtᵀ·x ;  dW = dyᵀ·x ;  dbias = Σ_rows dy
      G         = scaling · dyᵀ·u                        (out, r), one reduction over M
      db        = out_scale ⊙ G ;  dout_scale = Σ_r b ⊙ G

    Everything but the products with dy and x is (M, r) or (M, m) work on the saved t and g
    (u and s_eff are recomputed from them); no (M, out) tensor other than dy itself exists.
    On the Triton backend that work is one kernel, x_at_router_backward (t and du read twice,
    dt and u written once); the "torch" strategy runs the same formulas as PyTorch ops.
    With adapter dropout (t = (x ⊙ keep)·aᵀ) the mask is redrawn from its seed:
    dx = dy·W + (dt·a) ⊙ keep and da = dtᵀ·(x ⊙ keep) (input_side_grads).
    """
    need_x, need_w, need_a, need_lam, need_gi, need_go, need_b, need_bias, need_os = needs
    acc = t.dtype
    need_dt = need_x or need_a
    need_u = need_b or need_os
    grads = [None] * len(_ARGS)
    dt = u = None
    if need_dt or need_lam or need_gi or need_go:
        if strategy == "torch":
            du = up_projection_grad(dy, b, out_scale, scaling, acc)
            dt, dlambdas, dgate_in, dgate_out = _router_backward(du, t, g, gate_in, gate_out,
                                                                  lambdas)
        else:
            from svk.kernels import x_at
            from svk.kernels.x_at_router import x_at_router_backward
            du, _ = x_at(dy, _b_eff(b, out_scale, scaling, acc), a_transposed=True)
            dt, u, dlambdas, dgate_in, dgate_out = x_at_router_backward(
                du, t, g, gate_in, gate_out, lambdas, need_dt=need_dt,
                u_dtype=dy.dtype if need_u else None)
        if need_lam:
            grads[3] = dlambdas.to(lambdas.dtype)
        if need_gi:
            grads[4] = dgate_in.to(gate_in.dtype)
        if need_go:
            grads[5] = dgate_out.to(gate_out.dtype)
    grads[0], grads[1], grads[2] = input_side_grads(
        dy, x, weight, a, dt, need_x=need_x, need_w=need_w, need_a=need_a,
        triton=strategy != "torch", dropout=dropout, seed=seed)
    if need_u:
        if u is None:
            u = (t * (g @ lambdas.to(acc))).to(dy.dtype)
        # G = dyᵀ·u (out, r) gives both db and d_out_scale without an (M, out) tensor.
        big_g = (dy.t() @ u).to(acc) * scaling
        if need_b:
            grads[6] = (big_g if out_scale is None
                        else big_g * out_scale.to(acc)[:, None]).to(b.dtype)
        if need_os:
            grads[8] = (b.to(acc) * big_g).sum(1).to(out_scale.dtype)
    if need_bias:
        grads[7] = dy.sum(0)
    return grads


sv_mixture_linear_op = differentiable_op(
    "sv_mixture_linear",
    args=_ARGS,
    optional=("bias", "out_scale"),
    scalars=(("scaling", "float"), ("dropout", "float"), ("seed", "int")),
    extras=("t", "g"),
    forward=_forward,
    backward=_backward,
    fake_extras=lambda x, weight, a, lambdas, *_: [
        ((x.shape[0], a.shape[0]), _acc_dtype(x)),
        ((x.shape[0], lambdas.shape[0]), _acc_dtype(x))],
)


def _strategy(backend):
    if backend == "torch":
        return "torch"
    _dispatch.forced_strategy()  # validates SVK_STRATEGY; every Triton strategy is "fused" here
    return "fused"


def sv_mixture_linear(x, weight, a, lambdas, gate_in, gate_out, b, *, bias=None, out_scale=None,
                      scaling=1.0, backend="auto", return_gates=False, dropout=0.0):
    """Mo-SARA (Eq. 5–6) fused: y = x·Wᵀ + bias + scaling·((t ⊙ g·lambdas)·bᵀ) ⊙ out_scale,
    with t = x·aᵀ and per-token gates g = softmax((t·gate_in) ⊗ gate_out) (DESIGN.md §2).

    x (..., in); weight (out, in) and bias (out,) in x's dtype; a (r, in) and b (out, r) the
    frozen singular vectors; lambdas (m, r) one set of singular values per head; gate_in (r,),
    gate_out (m,) the rank-1 router; out_scale (out,) the zero-initialised column scale.
    Adapter tensors may have any float dtype; products accumulate in fp32 and y has x's dtype.
    Differentiable in every tensor that requires grad; saves x plus t (M, r) and g (M, m) in
    fp32 for backward, never an (M, out) tensor.

    backend: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch". The Triton backend
    has a single strategy, "fused" (the update depends on the token, so there is no merged
    weight; see the module docstring).

    dropout: probability of zeroing each element of the adapter path's input (t =
    dropout(x)·aᵀ; the base GEMM sees x); 0 = off. The mask comes from a seed each call draws
    from torch's default generator (Triton: Philox in the kernels) and is redrawn in
    backward, never stored.

    return_gates: when True, returns (y, gates) where gates (..., m) are the router's
    per-token head weights g, detached, in fp32 (fp64 for fp64 x) — the very tensor the
    forward computed and saves for backward, so reading it costs nothing. Average it over the
    leading dimensions for the per-head statistics Mo-SARA plots (e.g. gates.mean((0, 1))).
    Do not modify it in place: it is shared with autograd's saved state (which would then
    raise in backward).
    """
    x, weight, bias = _dispatch.autocast_base(x, weight, bias)
    check(x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale)
    if not isinstance(return_gates, bool):
        raise TypeError(f"return_gates must be a bool, got {type(return_gates).__name__}")
    return run(x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale,
               _checks.scaling(scaling), backend, return_gates, _checks.dropout(dropout))


def check(x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale):
    """Every argument check of sv_mixture_linear (a module runs it once, then checks x)."""
    out_features, in_features = _checks.base_layer(x, weight, bias)
    for name, value in (("a", a), ("lambdas", lambdas), ("gate_in", gate_in),
                        ("gate_out", gate_out), ("b", b)):
        _checks.tensor(name, value)
    _checks.tensor("out_scale", out_scale, optional=True)
    r = down_projection_rank(a, in_features)
    if lambdas.dim() != 2 or lambdas.shape[1] != r:
        raise ValueError(f"lambdas must have shape (m, r={r}) (one set of singular values per "
                         f"head), got {tuple(lambdas.shape)}")
    heads = lambdas.shape[0]
    if heads == 0:
        raise ValueError("lambdas has 0 heads; the mixture needs m ≥ 1")
    _checks.shape("gate_in", gate_in, (r,), "r")
    _checks.shape("gate_out", gate_out, (heads,), "m, the number of heads in lambdas")
    _checks.shape("b", b, (out_features, r), "out, r")
    _checks.shape("out_scale", out_scale, (out_features,), "out")
    _checks.same_device(x, weight=weight, a=a, lambdas=lambdas, gate_in=gate_in,
                        gate_out=gate_out, b=b, bias=bias, out_scale=out_scale)


def run(x, weight, a, lambdas, gate_in, gate_out, b, bias, out_scale, scaling, backend,
        return_gates=False, dropout=0.0):
    """sv_mixture_linear on checked arguments."""
    strategy = _strategy(_dispatch.resolve_backend(backend, x))
    seed = 0 if dropout == 0.0 else draw_seed()
    out_features = weight.shape[0]
    flat = x.dim() != 2
    x2 = x.reshape(-1, weight.shape[1]) if flat else x
    # The full op (not the y-only call) so that the gates it computed can be handed out
    # without recomputing the router.
    y, _, g = sv_mixture_linear_op.full(x2, weight, a, lambdas, gate_in, gate_out, b, bias,
                                        out_scale, scaling, dropout, seed, strategy)
    if flat:
        y = y.reshape(*x.shape[:-1], out_features)
    if return_gates:
        return y, g.detach().reshape(*x.shape[:-1], lambdas.shape[0])
    return y
