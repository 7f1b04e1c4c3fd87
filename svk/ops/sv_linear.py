"""svk.sv_linear: a frozen linear layer plus a singular-value adapter, fused.

    t = x·aᵀ                 (M, r)
    p = t ⊙ s ;  u = p·coreᵀ  (u = p without core)
    y = x·Wᵀ + bias + u·b_effᵀ,   b_eff = scaling · out_scale ⊙ b   (out, r)

Folding scaling and out_scale into b_eff (an (out, r) tensor) makes the adapter one rank-r
product added to the base GEMM's accumulator; no (M, out) intermediate exists.
"""
import torch
import torch.nn.functional as F

from svk.kernels._limits import MAX_EPILOGUE_RANK, rank_pad
from svk.ops import _checks, _dispatch
from svk.ops._common import (acc_dtype, add_up_projection, cast, down_projection_rank,
                             draw_seed, dropout_keep, input_side_grads, up_projection_grad)
from svk.ops._common import b_eff as _b_eff
from svk.ops._library import differentiable_op


def _forward(x, weight, a, s, b, bias, core, out_scale, scaling, dropout, seed, strategy):
    """Returns (y, t): y in x's dtype, t = x·aᵀ in fp32 (saved for backward). With dropout
    > 0 the adapter path reads dropout(x) (mask from `seed`); the base GEMM reads x."""
    acc = acc_dtype(x)
    if strategy == "torch":
        xa = x if dropout == 0.0 else x * dropout_keep(x.shape, x, dropout, seed)
        t = cast(F.linear(xa, cast(a, x.dtype)), acc)
        u = t * cast(s, acc)
        if core is not None:
            u = F.linear(u, cast(core, acc))
        return add_up_projection(F.linear(x, weight, bias), u, b, out_scale, scaling), t
    from svk import kernels
    b_eff = _b_eff(b, out_scale, scaling, acc)
    if strategy == "one_pass":
        return kernels.xw_plus_xasb(x, weight, a, b_eff, bias, s=s, core=core, dropout=dropout,
                                    seed=seed)
    if strategy == "merged":
        # W_eff folds the adapter into the base weight, which sees x: no place for a mask
        # (run routes dropout calls to fused).
        assert dropout == 0.0, "the merged strategy cannot take adapter dropout"
        t, _ = kernels.x_at(x, a)
        return kernels.xw_plus_ub(x, _merged_weight(weight, a, s, b_eff, core), bias=bias), t
    # The mask falls on x·aᵀ only (x_at draws it in-kernel); the base GEMM reads x.
    t, u = kernels.x_at(x, a, s, core, dropout=dropout, seed=seed)
    return kernels.xw_plus_ub(x, weight, u, b_eff, bias), t


def _merged_weight(weight, a, s, b_eff, core):
    """W_eff = W + b_eff·core·diag(s)·a, transient: rebuilt in backward, never kept."""
    right = a.to(b_eff.dtype) * s.to(b_eff.dtype)[:, None]
    if core is not None:
        right = core.to(b_eff.dtype) @ right
    return torch.addmm(weight.to(b_eff.dtype), b_eff, right).to(weight.dtype)


def _backward(dy, x, weight, a, s, b, bias, core, out_scale, t, scaling, dropout, seed,
              strategy, needs):
    """Gradients of (x, weight, a, s, b, bias, core, out_scale), None where not needed.

    Forward: t = x·aᵀ, p = t ⊙ s, u = p·coreᵀ, y = x·Wᵀ + bias + u·b_effᵀ with
    b_eff = scaling·out_scale ⊙ b. Chain rule, with dy (M, out):

      du        = dy·b_eff                      (M, r)   one skinny pass over dy (x_at kernel)
      dp        = du·core ;  dt = dp ⊙ s        (u = p·coreᵀ, p = t ⊙ s)
      ds        = Σ_rows dp ⊙ t ;  dcore = duᵀ·p
      dx        = dy·W + dt·a                   one GEMM-plus-r kernel (dy·W_eff when merged)
      dW        = dyᵀ·x ;  da = dtᵀ·x ;  dbias = Σ_rows dy
      G         = scaling·dyᵀ·u                 (out, r), one reduction over M
      db        = out_scale ⊙ G ;  dout_scale = Σ_r b ⊙ G   (y's term is Σ_r u_r·b_eff[:, r])

    Only t is saved (u and p are recomputed from it in O(M·r²)); no (M, out) tensor other
    than dy exists. With adapter dropout (t = (x ⊙ keep)·aᵀ) the mask is regenerated from
    its seed: dx = dy·W + (dt·a) ⊙ keep and da = dtᵀ·(x ⊙ keep) (input_side_grads; on the
    Triton path the kernels redraw it with Philox, as the forward's kernels drew it).
    """
    need_x, need_w, need_a, need_s, need_b, need_bias, need_core, need_os = needs
    acc = acc_dtype(x)
    sf = cast(s, acc)
    triton_path = strategy != "torch"
    w_eff = None
    if triton_path:
        from svk import kernels
        b_eff = _b_eff(b, out_scale, scaling, acc)
        du, _ = kernels.x_at(dy, b_eff, a_transposed=True)
        if need_x and strategy == "merged":
            w_eff = _merged_weight(weight, a, s, b_eff, core)
    else:
        du = up_projection_grad(dy, b, out_scale, scaling, acc)
    dp = du @ cast(core, acc) if core is not None else du
    dt = dp * sf
    p = t * sf
    grads = [None] * 8
    grads[0], grads[1], grads[2] = input_side_grads(
        dy, x, weight, a, dt, need_x=need_x, need_w=need_w, need_a=need_a,
        triton=triton_path, w_eff=w_eff, dropout=dropout, seed=seed)
    if need_s:
        grads[3] = cast((dp * t).sum(0), s.dtype)
    if need_b or need_os:
        # G = dyᵀ·u (out, r) gives both db = scaling·out_scale ⊙ G and
        # d_out_scale = scaling·rowsum(b ⊙ G): one reduction over M, no (M, out) tensor.
        u = F.linear(p, cast(core, acc)) if core is not None else p
        g = cast(dy.t() @ cast(u, dy.dtype), acc)
        if scaling != 1.0:
            g = g * scaling
        if need_b:
            grads[4] = cast(g if out_scale is None else g * cast(out_scale, acc)[:, None],
                            b.dtype)
        if need_os:
            grads[7] = cast((cast(b, acc) * g).sum(1), out_scale.dtype)
    if need_bias:
        grads[5] = dy.sum(0)
    if need_core:
        grads[6] = cast(du.t() @ p, core.dtype)
    return grads


sv_linear_op = differentiable_op(
    "sv_linear",
    args=("x", "weight", "a", "s", "b", "bias", "core", "out_scale"),
    optional=("bias", "core", "out_scale"),
    scalars=(("scaling", "float"), ("dropout", "float"), ("seed", "int")),
    extras=("t",),
    forward=_forward,
    backward=_backward,
    fake_extras=lambda x, weight, a, *_: [((x.shape[0], a.shape[0]), acc_dtype(x))],
)


def sv_linear(x, weight, a, s, b, *, bias=None, core=None, out_scale=None, scaling=1.0,
              backend="auto", dropout=0.0):
    """y = x·Wᵀ + bias + scaling·(((x·aᵀ) ⊙ s)·coreᵀ·bᵀ) ⊙ out_scale, fused (DESIGN.md §2).

    x (..., in); weight (out, in) and bias (out,) in x's dtype; a (r, in), s (r,), b (out, r),
    core (r, r), out_scale (out,) in any float dtype (fp32 adapters on a bf16 model are fine).
    Products accumulate in fp32; y has x's dtype. Differentiable in every tensor that
    requires grad; saves x and one (M, r) fp32 tensor for backward.
    backend: "auto" (PyTorch on CPU; on CUDA the fastest of PyTorch and the Triton
    strategies, timed once per shape bucket), "triton" or "torch".
    dropout: probability p of zeroing each element of the adapter path's input (t =
    dropout(x)·aᵀ; the base GEMM sees x); 0 = off. Each call draws a seed from torch's
    default generator (torch.manual_seed makes it deterministic); the mask comes from that
    seed (PyTorch: a seeded torch.Generator; Triton: Philox in the kernels) and is redrawn
    in backward, never stored. The merged strategy has no adapter input to drop, so dropout
    calls run fused instead.
    """
    x, weight, bias = _dispatch.autocast_base(x, weight, bias)
    check(x, weight, a, s, b, bias, core, out_scale)
    return run(x, weight, a, s, b, bias, core, out_scale, _checks.scaling(scaling), backend,
               _checks.dropout(dropout))


def check(x, weight, a, s, b, bias, core, out_scale):
    """Every argument check of sv_linear (a module runs it once, then only checks x).

    The common case is decided by one expression of attribute reads; only when it fails do
    the detailed checks run, to name the argument and what was wrong."""
    try:
        dtype, device, (out_features, in_features), r = x.dtype, x.device, weight.shape, a.shape[0]
        if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)
                and weight.dtype is dtype and dtype in _checks.FLOAT_DTYPES and x.shape[-1] == in_features
                and a.shape == (r, in_features) and r > 0 and s.shape == (r,)
                and b.shape == (out_features, r)
                and a.dtype in _checks.FLOAT_DTYPES and s.dtype in _checks.FLOAT_DTYPES
                and b.dtype in _checks.FLOAT_DTYPES
                and weight.device == device and a.device == device and s.device == device
                and b.device == device
                and (bias is None or (bias.shape == (out_features,) and bias.dtype is dtype
                                      and bias.device == device))
                and (core is None or (core.shape == (r, r) and core.device == device
                                      and core.dtype in _checks.FLOAT_DTYPES))
                and (out_scale is None or (out_scale.shape == (out_features,)
                                           and out_scale.device == device
                                           and out_scale.dtype in _checks.FLOAT_DTYPES))):
            return
    except (AttributeError, TypeError, ValueError, IndexError):
        pass          # not tensors, or wrong ranks: the detailed checks below say which
    out_features, in_features = _checks.base_layer(x, weight, bias)
    for name, value in (("a", a), ("s", s), ("b", b)):
        _checks.tensor(name, value)
    _checks.tensor("core", core, optional=True)
    _checks.tensor("out_scale", out_scale, optional=True)
    r = down_projection_rank(a, in_features)
    _checks.shape("s", s, (r,), "r")
    _checks.shape("b", b, (out_features, r), "out, r")
    _checks.shape("core", core, (r, r), "r, r")
    _checks.shape("out_scale", out_scale, (out_features,), "out")
    _checks.same_device(x, weight=weight, a=a, s=s, b=b, bias=bias, core=core,
                        out_scale=out_scale)


def run(x, weight, a, s, b, bias, core, out_scale, scaling, backend, dropout=0.0):
    """sv_linear on checked arguments: backend and strategy choice, then one op call."""
    backend = _dispatch.resolve_backend(backend, x)
    flat = x.dim() != 2
    x2 = x.reshape(-1, weight.shape[1]) if flat else x
    seed = 0 if dropout == 0.0 else draw_seed()
    if backend == "torch":
        strategy = "torch"
    else:
        strategy = _strategy(x2, weight, a, s, b, bias, core, out_scale, scaling, dropout)
        if dropout != 0.0:
            strategy = _dispatch.dropout_strategy(strategy)
    y = sv_linear_op(x2, weight, a, s, b, bias, core, out_scale, scaling, dropout, seed,
                     strategy)
    return y.reshape(*x.shape[:-1], weight.shape[0]) if flat else y


def _strategy(x, weight, a, s, b, bias, core, out_scale, scaling, dropout=0.0):
    m, (out_features, in_features), r = x.shape[0], weight.shape, a.shape[0]
    padded = rank_pad(r)
    if _dispatch.forced_strategy() is not None or not _dispatch.measured_choice(x.device):
        return _dispatch.choose_strategy(m, in_features, out_features, padded,
                                         MAX_EPILOGUE_RANK, x.device, weight.dtype)
    key = (f"sv_linear|m{_dispatch.m_bucket(m)}|{in_features}x{out_features}|r{r}|"
           f"{x.dtype}|{a.dtype}|bias{bias is not None}|core{core is not None}|"
           f"os{out_scale is not None}" + ("|dropout" if dropout != 0.0 else ""))
    candidates = ["torch", "fused"]
    if padded <= MAX_EPILOGUE_RANK:
        candidates.append("one_pass")
    # Timed with dropout on where the call has it: one pass then draws the mask in every
    # N-tile, which may change the winner.
    call = (x, weight, a, s, b, bias, core, out_scale, scaling, dropout, 1)
    return _dispatch.TUNER.choose(key, x.device, {
        name: (lambda name=name: _forward(*call, name)) for name in candidates})
