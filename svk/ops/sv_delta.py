"""svk.ops.sv_delta: a singular-value adapter added onto a base output the caller computed.

For a base layer svk cannot read as a dense weight (a bitsandbytes or torchao quantized
layer), the base product is that layer's own forward, y_base = base_layer(x), and the adapter
is svk's low-rank path added on top, one op:

    t     = x·aᵀ                                   (M, r)
    u     = (t ⊙ s)·coreᵀ                          (core optional)          sv_delta
          = t ⊙ (g·lambdas), g = softmax((t·gate_in) ⊗ gate_out)           sv_mixture_delta
    y     = y_base + u·b_effᵀ − (x·a0ᵀ)·b0ᵀ,       b_eff = scaling·out_scale ⊙ b

The last term (a0 (k, in), b0 (out, k), optional, frozen) is the low-rank part KaSA and PiSSA
remove from the base: on a quantized base it is subtracted on the fly instead of being written
into the codes (svk.nn.quantized). Both up projections are one addmm onto y_base.

Gradients: dy_base = dy (autograd carries it into the base layer's own backward, which gives
the base's share of dx); the op adds the adapter's share dx = dt·a − (dy·b0)·a0 and the adapter
tensors' gradients, with the formulas of svk.ops.sv_linear / sv_mixture_linear (the router's
are theirs, imported). Saved for backward: t (M, r) (and g (M, m) for the mixture) plus x only
when a needs a gradient (da = dtᵀ·x); never an (M, out) tensor.

Like svk.ops._library.differentiable_op, one definition of the math is exposed twice: an
autograd.Function in eager mode and torch.library custom ops (svk::sv_delta,
svk::sv_mixture_delta and their _backward) that torch.compile traces. differentiable_op itself
cannot express these ops: its fake output is (x.shape[0], weight.shape[0]) and its fake dx is
(M, weight.shape[1]), while here the output has y_base's shape and no weight exists.
The math is PyTorch on every device: the adapter is rank-r work next to the base GEMM, and the
base GEMM is the quantizer's own kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from svk.ops import _checks
from svk.ops._common import acc_dtype, b_eff, cast, up_projection_grad
from svk.ops._library import DifferentiableOp, _c_apply
from svk.ops.sv_mixture_linear import _router, _router_backward

_EMPTY = (0,)


def _schema(args, optional):
    return ", ".join(f"Tensor{'?' if a in optional else ''} {a}" for a in args)


class _DeltaOp(DifferentiableOp):
    """op(*tensors, scaling) -> (y, *extras), eager Function or custom op while compiling
    (DifferentiableOp.full chooses, as for the other ops)."""

    def __init__(self, name, args, optional, extras, forward, backward, fake_extras):
        n_in = len(args)
        a_at = args.index("a")
        self.name, self.n_in = name, n_in

        def save(ctx, inputs, output):
            x = inputs[0]
            if not ctx.needs_input_grad[a_at]:
                # da = dtᵀ·x is the only reader of x: without it x is not kept alive.
                x = x.new_empty(_EMPTY)
            # y_base (M, out) is never read by backward (its gradient is dy): an empty
            # stand-in of its dtype keeps no (M, out) tensor alive.
            ctx.save_for_backward(x, inputs[1].new_empty(_EMPTY), *inputs[2:n_in], *output[1:])
            ctx.scaling = inputs[n_in]

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(*call):
                return forward(*call)

            @staticmethod
            def setup_context(ctx, inputs, output):
                save(ctx, inputs, output)
                ctx.mark_non_differentiable(*output[1:])

            @staticmethod
            def backward(ctx, dy, *_extra_grads):
                if torch.is_grad_enabled():
                    raise RuntimeError(f"svk.{name} does not support double backward "
                                       "(create_graph=True): its backward is not differentiable")
                saved = ctx.saved_tensors
                grads = backward(dy, *saved, ctx.scaling, ctx.needs_input_grad[:n_in])
                return (*grads, None)

            @staticmethod
            def jvp(ctx, *tangents):
                raise RuntimeError(f"svk.{name} does not support forward-mode AD; use reverse "
                                   "mode")

        Function.__name__ = Function.__qualname__ = f"{name}_function"
        Function.n_in = n_in
        Function.run_forward = staticmethod(lambda call: forward(*call))
        Function.c_apply = _c_apply.__get__(None, Function)
        self.function = Function
        self.forward = forward
        self._required = tuple(i for i, arg in enumerate(args) if arg not in optional)
        self._optional = tuple(i for i, arg in enumerate(args) if arg in optional)

        outs = ", ".join(["Tensor"] * (1 + len(extras)))
        extra_schema = "".join(f", Tensor {e}" for e in extras)

        @torch.library.custom_op(f"svk::{name}", mutates_args=(),
                                 schema=f"({_schema(args, optional)}, float scaling) -> ({outs})")
        def forward_op(*call):
            with torch.autocast(call[0].device.type, enabled=False):
                return forward(*call)

        @forward_op.register_fake
        def _(*call):
            x, y_base = call[0], call[1]
            return (y_base.new_empty(y_base.shape),
                    *(x.new_empty(s, dtype=d) for s, d in fake_extras(*call[:n_in])))

        @torch.library.custom_op(
            f"svk::{name}_backward", mutates_args=(),
            schema=(f"(Tensor dy, {_schema(args, optional)}{extra_schema}, float scaling, "
                    "bool[] needs) -> Tensor[]"))
        def backward_op(dy, *call):
            with torch.autocast(dy.device.type, enabled=False):
                grads = backward(dy, *call)
            return [g if g is not None else dy.new_empty(_EMPTY) for g in grads]

        @backward_op.register_fake
        def _(dy, *call):
            tensors, needs = call[:n_in], call[-1]
            a = tensors[a_at]
            # x may be the empty stand-in: dx has dy's rows and a's in-features.
            shapes = [(dy.shape[0], a.shape[1])] + [None if t is None else t.shape
                                                     for t in tensors[1:]]
            return [t.new_empty(s) if need else dy.new_empty(_EMPTY)
                    for t, s, need in zip(tensors, shapes, needs)]

        def autograd_backward(ctx, dy, *_extra_grads):
            needs = [bool(n) for n in ctx.needs_input_grad[:n_in]]
            # y_base's gradient is dy itself, passed here: a custom op may not return one of
            # its inputs.
            grads = list(backward_op(dy, *ctx.saved_tensors, ctx.scaling,
                                     [needs[0], False, *needs[2:]]))
            grads[1] = dy
            return (*(g if need else None for g, need in zip(grads, needs)), None)

        forward_op.register_autograd(
            autograd_backward,
            setup_context=lambda ctx, inputs, output: save(ctx, inputs, output))
        self.custom_op = forward_op
        self.backward_op = backward_op


# ---- sv_delta ---------------------------------------------------------------------------------
def _add_up(y_base, u, b_folded, x, removed_a, removed_b, acc):
    """y_base + u·b_foldedᵀ − (x·a0ᵀ)·b0ᵀ as one addmm in y_base's dtype."""
    if removed_a is not None:
        t0 = cast(F.linear(x, cast(removed_a, x.dtype)), acc)
        u = torch.cat([u, -t0], dim=1)
        b_folded = torch.cat([b_folded, cast(removed_b, acc)], dim=1)
    return torch.addmm(y_base, cast(u, y_base.dtype), cast(b_folded, y_base.dtype).t())


def _input_grad(dy, dt, x_dtype, a, removed_a, removed_b):
    """The adapter's share of dx: dt·a − (dy·b0)·a0."""
    dx = cast(dt, x_dtype) @ cast(a, x_dtype)
    if removed_a is not None:
        d0 = dy @ cast(removed_b, dy.dtype)
        dx = dx.addmm_(cast(d0, x_dtype), cast(removed_a, x_dtype), alpha=-1.0)
    return dx


def _up_grads(dy, u, b, out_scale, scaling, acc, need_b, need_os):
    """(db, dout_scale) from G = scaling·dyᵀ·u (out, r): no (M, out) tensor."""
    g = cast(dy.t() @ cast(u, dy.dtype), acc) * scaling
    db = dos = None
    if need_b:
        db = cast(g if out_scale is None else g * cast(out_scale, acc)[:, None], b.dtype)
    if need_os:
        dos = cast((cast(b, acc) * g).sum(1), out_scale.dtype)
    return db, dos


def _delta_forward(x, y_base, a, s, b, core, out_scale, removed_a, removed_b, scaling):
    acc = acc_dtype(x)
    t = cast(F.linear(x, cast(a, x.dtype)), acc)
    u = t * cast(s, acc)
    if core is not None:
        u = F.linear(u, cast(core, acc))
    return _add_up(y_base, u, b_eff(b, out_scale, scaling, acc), x, removed_a, removed_b,
                   acc), t


def _delta_backward(dy, x, y_base, a, s, b, core, out_scale, removed_a, removed_b, t, scaling,
                    needs):
    """Gradients of (x, y_base, a, s, b, core, out_scale, a0, b0); the formulas of
    svk.ops.sv_linear._backward without the base GEMM's (the base layer's autograd has them):
    du = dy·b_eff, dp = du·core, dt = dp ⊙ s, ds = Σ_rows dp ⊙ t, dcore = duᵀ·p,
    da = dtᵀ·x."""
    need_x, need_y, need_a, need_s, need_b, need_core, need_os = needs[:7]
    acc = t.dtype
    sf = cast(s, acc)
    du = up_projection_grad(dy, b, out_scale, scaling, acc)
    dp = du @ cast(core, acc) if core is not None else du
    dt = dp * sf
    p = t * sf
    grads = [None] * 9
    if need_x:
        grads[0] = _input_grad(dy, dt, x.dtype, a, removed_a, removed_b)
    if need_y:
        grads[1] = dy
    if need_a:
        grads[2] = cast(cast(dt, x.dtype).t() @ x, a.dtype)
    if need_s:
        grads[3] = cast((dp * t).sum(0), s.dtype)
    if need_b or need_os:
        u = F.linear(p, cast(core, acc)) if core is not None else p
        grads[4], grads[6] = _up_grads(dy, u, b, out_scale, scaling, acc, need_b, need_os)
    if need_core:
        grads[5] = cast(du.t() @ p, core.dtype)
    return grads


_DELTA_ARGS = ("x", "y_base", "a", "s", "b", "core", "out_scale", "removed_a", "removed_b")
sv_delta_op = _DeltaOp(
    "sv_delta", _DELTA_ARGS, optional=("core", "out_scale", "removed_a", "removed_b"),
    extras=("t",), forward=_delta_forward, backward=_delta_backward,
    fake_extras=lambda x, y_base, a, *_: [((x.shape[0], a.shape[0]), acc_dtype(x))])


# ---- sv_mixture_delta -------------------------------------------------------------------------
def _mixture_forward(x, y_base, a, lambdas, gate_in, gate_out, b, out_scale, scaling):
    acc = acc_dtype(x)
    t = cast(F.linear(x, cast(a, x.dtype)), acc)
    g, u = _router(t, gate_in, gate_out, lambdas)
    return _add_up(y_base, u, b_eff(b, out_scale, scaling, acc), x, None, None, acc), t, g


def _mixture_backward(dy, x, y_base, a, lambdas, gate_in, gate_out, b, out_scale, t, g, scaling,
                      needs):
    """Gradients of (x, y_base, a, lambdas, gate_in, gate_out, b, out_scale): the router's
    from svk.ops.sv_mixture_linear._router_backward, the rest as _delta_backward."""
    need_x, need_y, need_a, need_lam, need_gi, need_go, need_b, need_os = needs
    acc = t.dtype
    grads = [None] * 8
    if need_x or need_a or need_lam or need_gi or need_go:
        du = up_projection_grad(dy, b, out_scale, scaling, acc)
        dt, dlam, dgi, dgo = _router_backward(du, t, g, gate_in, gate_out, lambdas)
        if need_x:
            grads[0] = _input_grad(dy, dt, x.dtype, a, None, None)
        if need_a:
            grads[2] = cast(cast(dt, x.dtype).t() @ x, a.dtype)
        grads[3] = cast(dlam, lambdas.dtype) if need_lam else None
        grads[4] = cast(dgi, gate_in.dtype) if need_gi else None
        grads[5] = cast(dgo, gate_out.dtype) if need_go else None
    if need_y:
        grads[1] = dy
    if need_b or need_os:
        u = t * (g @ cast(lambdas, acc))
        grads[6], grads[7] = _up_grads(dy, u, b, out_scale, scaling, acc, need_b, need_os)
    return grads


_MIXTURE_ARGS = ("x", "y_base", "a", "lambdas", "gate_in", "gate_out", "b", "out_scale")
sv_mixture_delta_op = _DeltaOp(
    "sv_mixture_delta", _MIXTURE_ARGS, optional=("out_scale",), extras=("t", "g"),
    forward=_mixture_forward, backward=_mixture_backward,
    fake_extras=lambda x, y_base, a, lambdas, *_: [((x.shape[0], a.shape[0]), acc_dtype(x)),
                                                   ((x.shape[0], lambdas.shape[0]),
                                                    acc_dtype(x))])


# ---- public functions -------------------------------------------------------------------------
def _check(x, y_base, a, b, out_scale, **tensors):
    """x (..., in), y_base (..., out) with x's leading shape; a (r, in), b (out, r)."""
    _checks.tensor("x", x)
    _checks.tensor("y_base", y_base)
    for name, value in (("a", a), ("b", b)):
        _checks.tensor(name, value)
    if x.dim() < 1 or a.dim() != 2 or a.shape[1] != x.shape[-1] or a.shape[0] == 0:
        raise ValueError(f"a must have shape (r ≥ 1, in={x.shape[-1] if x.dim() else '?'}) "
                         f"matching x {tuple(x.shape)}, got {tuple(a.shape)}")
    if y_base.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"y_base {tuple(y_base.shape)} must have x's leading dimensions "
                         f"{tuple(x.shape[:-1])}")
    r, out_features = a.shape[0], y_base.shape[-1]
    _checks.shape("b", b, (out_features, r), "out, r")
    _checks.tensor("out_scale", out_scale, optional=True)
    _checks.shape("out_scale", out_scale, (out_features,), "out")
    _checks.same_device(x, y_base=y_base, a=a, b=b, out_scale=out_scale, **tensors)
    return r, out_features


def _flat(x, y_base):
    return x.reshape(-1, x.shape[-1]), y_base.reshape(-1, y_base.shape[-1])


def sv_delta(x, y_base, a, s, b, *, core=None, out_scale=None, scaling=1.0, removed_a=None,
             removed_b=None):
    """y = y_base + scaling·(((x·aᵀ) ⊙ s)·coreᵀ·bᵀ) ⊙ out_scale − (x·a0ᵀ)·b0ᵀ.

    y_base (..., out) is the base layer's output for x (..., in), computed by the caller (a
    quantized layer's forward); gradients flow into it unchanged. a (r, in), s (r,), b (out, r),
    core (r, r), out_scale (out,) as in svk.sv_linear; removed_a (k, in) and removed_b (out, k)
    are a frozen low-rank part subtracted from the base (KaSA/PiSSA on a quantized base).
    Adapter math in fp32 (fp64 for fp64 x); y has y_base's dtype."""
    r, out_features = _check(x, y_base, a, b, out_scale, s=s, core=core, removed_a=removed_a,
                             removed_b=removed_b)
    _checks.tensor("s", s)
    _checks.shape("s", s, (r,), "r")
    _checks.tensor("core", core, optional=True)
    _checks.shape("core", core, (r, r), "r, r")
    if (removed_a is None) != (removed_b is None):
        raise ValueError("removed_a and removed_b go together (the removed part is b0·a0)")
    if removed_a is not None:
        _checks.tensor("removed_a", removed_a)
        _checks.tensor("removed_b", removed_b)
        k = removed_a.shape[0] if removed_a.dim() == 2 else -1
        _checks.shape("removed_a", removed_a, (k, x.shape[-1]), "k, in")
        _checks.shape("removed_b", removed_b, (out_features, k), "out, k")
        if removed_a.requires_grad or removed_b.requires_grad:
            raise ValueError("removed_a and removed_b are the frozen part taken out of the base; "
                             "they must not require grad")
    x2, y2 = _flat(x, y_base)
    y = sv_delta_op.full(x2, y2, a, s, b, core, out_scale, removed_a, removed_b,
                         _checks.scaling(scaling))[0]
    return y.reshape(y_base.shape)


def sv_mixture_delta(x, y_base, a, lambdas, gate_in, gate_out, b, *, out_scale=None,
                     scaling=1.0, return_gates=False):
    """Mo-SARA's mixture (svk.sv_mixture_linear) added onto y_base:
    y = y_base + scaling·((t ⊙ g·lambdas)·bᵀ) ⊙ out_scale, t = x·aᵀ, g the router's gates.
    return_gates: also return g (..., m), detached, as sv_mixture_linear does."""
    r, _ = _check(x, y_base, a, b, out_scale, lambdas=lambdas, gate_in=gate_in,
                  gate_out=gate_out)
    for name, value in (("lambdas", lambdas), ("gate_in", gate_in), ("gate_out", gate_out)):
        _checks.tensor(name, value)
    if lambdas.dim() != 2 or lambdas.shape[1] != r or lambdas.shape[0] == 0:
        raise ValueError(f"lambdas must have shape (m ≥ 1, r={r}), got {tuple(lambdas.shape)}")
    _checks.shape("gate_in", gate_in, (r,), "r")
    _checks.shape("gate_out", gate_out, (lambdas.shape[0],), "m, the heads of lambdas")
    x2, y2 = _flat(x, y_base)
    y, _, g = sv_mixture_delta_op.full(x2, y2, a, lambdas, gate_in, gate_out, b, out_scale,
                                       _checks.scaling(scaling))
    y = y.reshape(y_base.shape)
    if return_gates:
        return y, g.detach().reshape(*x.shape[:-1], lambdas.shape[0])
    return y
