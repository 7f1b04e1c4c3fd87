"""torch.library registration shared by the ops.

Each op is two custom ops, `svk::<name>` (forward → (y, *extras)) and `svk::<name>_backward`
(→ one gradient per tensor input, an empty tensor where none is needed), with fake kernels so
torch.compile traces them, and an autograd formula linking the two. The forward saves its
tensor inputs (x and the parameters, which the caller holds anyway) plus the small extras it
returns, such as t = x·aᵀ; never an (M, out) tensor.
"""
import torch

_NONE = (0,)


def _tensor_schema(args, optional):
    return ", ".join(f"Tensor{'?' if a in optional else ''} {a}" for a in args)


def differentiable_op(name, *, args, optional, scalars, extras, forward, backward, fake_extras,
                      x_needed_by=("weight", "a")):
    """Registers `svk::name` and `svk::name_backward`; returns the forward as a callable
    `op(*tensors, *scalar_values, strategy) -> y`.

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
    scalar_schema = "".join(f", {kind} {scalar}" for scalar, kind in scalars)
    outs = ", ".join(["Tensor"] * (1 + len(extras)))
    extra_schema = "".join(f", Tensor {extra}" for extra in extras)

    x_users = [args.index(name) for name in x_needed_by]

    def strategy_for(rows, strategy):
        # An empty batch has nothing to launch; the PyTorch formulas handle M = 0 directly.
        return "torch" if rows == 0 else strategy

    @torch.library.custom_op(
        f"svk::{name}", mutates_args=(),
        schema=f"({_tensor_schema(args, optional)}{scalar_schema}, str strategy) -> ({outs})")
    def forward_op(*call):
        tensors, scalar_values, strategy = call[:n_in], call[n_in:-1], call[-1]
        x = tensors[0]
        with torch.autocast(x.device.type, enabled=False):
            return tuple(forward(*tensors, *scalar_values, strategy_for(x.shape[0], strategy)))

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
        tensors, strategy, needs = call[:n_in], call[-2], call[-1]
        saved = call[n_in:-2]
        with torch.autocast(dy.device.type, enabled=False):
            grads = backward(dy, *tensors, *saved, strategy_for(dy.shape[0], strategy), needs)
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

    def setup_context(ctx, inputs, output):
        x = inputs[0]
        if not any(ctx.needs_input_grad[i] for i in x_users):
            x = x.new_empty(_NONE)
        ctx.save_for_backward(x, *inputs[1:n_in], *output[1:])
        ctx.rest = inputs[n_in:]

    def autograd_backward(ctx, dy, *_extra_grads):
        needs = [bool(n) for n in ctx.needs_input_grad[:n_in]]
        grads = backward_op(dy, *ctx.saved_tensors, *ctx.rest, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), *([None] * (n_scalar + 1)))

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)

    def call(*arguments):
        return forward_op(*arguments)[0]

    return call
