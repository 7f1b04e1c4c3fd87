"""How each op is exposed to autograd and to torch.compile, from one definition of its math.

An op is defined once by two plain functions, forward(*tensors, *scalars, strategy) ->
(y, *extras) and backward(dy, *tensors, *extras, *scalars, strategy, needs) -> grads, and
`differentiable_op` wraps them two ways:

- eager: a `torch.autograd.Function` called directly (what Liger-Kernel and Unsloth do). Its
  Python cost is one apply; when no gradient can be needed (no_grad, inference_mode, or no
  input requiring grad) even that is skipped and forward runs as a plain function.
- compiled: `svk::<name>` and `svk::<name>_backward`, torch.library custom ops with fake
  kernels and an autograd formula, which torch.compile traces as opaque nodes. Their Python
  dispatch costs tens of microseconds per call, so they are used only while compiling.

Both save the same tensors for backward: the inputs (which the caller holds anyway; x only
when a gradient needs it) plus the small extras the forward returns, such as t = x·aᵀ; never
an (M, out) tensor. Forward-mode AD (jvp) and double backward are refused with a clear error
(the backward is not itself differentiable).
"""
import torch
from torch.autograd import forward_ad

_NONE = (0,)
_functorch_stack = torch._C._functorch.peek_interpreter_stack
_functorch_active = torch._C._are_functorch_transforms_active
# torch.autograd.Function.apply's Python wrapper binds default arguments through
# inspect.signature on every call (tens of µs) when setup_context is defined; the ops have no
# default arguments, so outside functorch transforms they call the C++ apply directly.
_c_apply = torch._C._FunctionBase.__dict__["apply"]


def _tensor_schema(args, optional):
    return ", ".join(f"Tensor{'?' if a in optional else ''} {a}" for a in args)


class DifferentiableOp:
    """`op(*tensors, *scalars, strategy) -> y` and `op.full(...) -> (y, *extras)`."""

    def __init__(self, name, function, custom_op, required, optional):
        self.name = name
        self.function = function
        self.custom_op = custom_op
        self._required, self._optional = required, optional

    def _requires_grad(self, call):
        # Loops with an early exit: a generator inside any() costs twice as much per call.
        for i in self._required:
            if call[i].requires_grad:
                return True
        for i in self._optional:
            t = call[i]
            if t is not None and t.requires_grad:
                return True
        return False

    def full(self, *call):
        if torch.compiler.is_compiling():
            return self.custom_op(*call)
        device_type = call[0].device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self._eager(call)
        return self._eager(call)

    def _eager(self, call):
        if not (torch.is_grad_enabled() and self._requires_grad(call)) and (
                forward_ad._current_level < 0 and _functorch_stack() is None):
            return self.function.run_forward(call)
        if _functorch_active():
            return self.function.apply(*call)
        return self.function.c_apply(*call)

    def __call__(self, *call):
        return self.full(*call)[0]


def differentiable_op(name, *, args, optional, scalars, extras, forward, backward, fake_extras,
                      x_needed_by=("weight", "a")):
    """Builds the eager autograd.Function and the torch.library ops for `svk::name`.

    args: tensor argument names (x first, weight second); optional: those that may be None.
    scalars: ((name, schema type), ...), e.g. (("scaling", "float"),).
    extras: names of the extra forward outputs saved for backward.
    forward(*tensors, *scalar_values, strategy) -> (y, *extras)
    backward(dy, *tensors, *extras, *scalar_values, strategy, needs) -> list of grads or None
    fake_extras(*tensors) -> [(shape, dtype)] of the extras, for the fake kernel.
    x_needed_by: the inputs whose gradients read x (dW = dyᵀ·x, da = dtᵀ·x). When none of them
    needs a gradient (LoRA-XS, SiVA, Mo-SARA) x is not saved at all — an empty tensor of its
    dtype stands in — so autograd does not keep the layer's input alive for the adapter.
    """
    n_in, n_scalar = len(args), len(scalars)
    x_users = tuple(args.index(arg) for arg in x_needed_by)
    stand_ins = {}

    def run_forward(call):
        tensors, scalar_values, strategy = call[:n_in], call[n_in:-1], call[-1]
        # An empty batch has nothing to launch; the PyTorch formulas handle M = 0 directly.
        if tensors[0].shape[0] == 0:
            strategy = "torch"
        return tuple(forward(*tensors, *scalar_values, strategy))

    def run_backward(dy, tensors, saved, rest, needs):
        strategy = rest[-1]
        if dy.shape[0] == 0:
            strategy = "torch"
        return backward(dy, *tensors, *saved, *rest[:-1], strategy, needs)

    def save(ctx, inputs, output, shared_stand_in=True):
        x = inputs[0]
        needs = ctx.needs_input_grad
        for i in x_users:
            if needs[i]:
                break
        else:
            if not shared_stand_in:         # tracing: a fake tensor must not be kept
                x = x.new_empty(_NONE)
            else:
                # One shared empty tensor per (dtype, device) stands in for the unsaved x.
                key = (x.dtype, x.device)
                x = stand_ins.get(key)
                if x is None:
                    x = stand_ins[key] = inputs[0].new_empty(_NONE)
        ctx.save_for_backward(x, *inputs[1:n_in], *output[1:])
        ctx.rest = inputs[n_in:]

    # ---- eager ------------------------------------------------------------------------
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(*call):
            return run_forward(call)

        @staticmethod
        def setup_context(ctx, inputs, output):
            save(ctx, inputs, output)
            ctx.mark_non_differentiable(*output[1:])

        @staticmethod
        def backward(ctx, dy, *_extra_grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"svk.{name} does not support double backward (create_graph=True): its "
                    "backward is not itself differentiable. Use svk.reference for "
                    "higher-order gradients")
            saved = ctx.saved_tensors
            # The backward functions return None for every input that needs no gradient.
            grads = run_backward(dy, saved[:n_in], saved[n_in:], ctx.rest,
                                 ctx.needs_input_grad[:n_in])
            return (*grads, *no_scalar_grads)

        @staticmethod
        def jvp(ctx, *tangents):
            raise RuntimeError(
                f"svk.{name} does not support forward-mode AD (torch.func.jvp, jacfwd, "
                "torch.autograd.forward_ad); use reverse mode, or svk.reference for jvp")

    no_scalar_grads = (None,) * (n_scalar + 1)
    Function.__name__ = Function.__qualname__ = f"{name}_function"
    Function.n_in = n_in
    Function.c_apply = _c_apply.__get__(None, Function)
    Function.run_forward = staticmethod(run_forward)

    # ---- torch.compile ----------------------------------------------------------------
    scalar_schema = "".join(f", {kind} {scalar}" for scalar, kind in scalars)
    outs = ", ".join(["Tensor"] * (1 + len(extras)))
    extra_schema = "".join(f", Tensor {extra}" for extra in extras)

    @torch.library.custom_op(
        f"svk::{name}", mutates_args=(),
        schema=f"({_tensor_schema(args, optional)}{scalar_schema}, str strategy) -> ({outs})")
    def forward_op(*call):
        with torch.autocast(call[0].device.type, enabled=False):
            return run_forward(call)

    @forward_op.register_fake
    def _(*call):
        tensors = call[:n_in]
        x, weight = tensors[0], tensors[1]
        y = x.new_empty((x.shape[0], weight.shape[0]))
        return (y, *(x.new_empty(shape, dtype=dtype) for shape, dtype in fake_extras(*tensors)))

    @torch.library.custom_op(
        f"svk::{name}_backward", mutates_args=(),
        schema=(f"(Tensor dy, {_tensor_schema(args, optional)}{extra_schema}{scalar_schema}, "
                "str strategy, bool[] needs) -> Tensor[]"))
    def backward_op(dy, *call):
        tensors, rest, needs = call[:n_in], call[-(n_scalar + 2):-1], call[-1]
        saved = call[n_in:-(n_scalar + 2)]
        with torch.autocast(dy.device.type, enabled=False):
            grads = run_backward(dy, tensors, saved, rest, needs)
        return [g if g is not None else dy.new_empty(_NONE) for g in grads]

    @backward_op.register_fake
    def _(dy, *call):
        tensors, needs = call[:n_in], call[-1]
        # x may be the empty stand-in: dx has dy's rows and weight's in-features. An optional
        # input that is None never needs a gradient.
        shapes = [(dy.shape[0], tensors[1].shape[1])] + [
            None if t is None else t.shape for t in tensors[1:]]
        return [t.new_empty(shape) if need else dy.new_empty(_NONE)
                for t, shape, need in zip(tensors, shapes, needs)]

    def autograd_backward(ctx, dy, *_extra_grads):
        needs = [bool(n) for n in ctx.needs_input_grad[:n_in]]
        grads = backward_op(dy, *ctx.saved_tensors, *ctx.rest, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), *([None] * (n_scalar + 1)))

    forward_op.register_autograd(
        autograd_backward,
        setup_context=lambda ctx, inputs, output: save(ctx, inputs, output, False))
    required = tuple(i for i, arg in enumerate(args) if arg not in optional)
    optional_at = tuple(i for i, arg in enumerate(args) if arg in optional)
    return DifferentiableOp(name, Function, forward_op, required, optional_at)
