"""svk.sv_bank_linear: many LoRA-XS adapters on one frozen layer, mixed in one batch.

    t = x·aᵀ                      (M, r)   shared by every adapter
    p = t ⊙ s
    u_i = p_i·cores[id_i]ᵀ         (M, r)   one gathered r×r matvec per row; id −1 → u_i = 0
    y = x·Wᵀ + bias + u·b_effᵀ,    b_eff = scaling·b   (out, r)

The per-row work between the two shared dense products is an r×r matvec, so the cost and the
number of kernel launches do not depend on how many distinct adapters a batch holds.

Strategies (backend="triton"): "one_pass" for 1–256 rows (one launch: xw_plus_xa_gather_core_b),
"fused" above (x_at_gather_core, then xw_plus_ub; two launches). backend="native" runs the
GEMMs in PyTorch and the gathered r×r step in svk's compiled op (csrc/, svk._native); it is
there for comparison and for CUDA machines without Triton. backend="auto": Triton on CUDA when
it is usable, else the native op when it is already built, else PyTorch; PyTorch on CPU. This
rule is provisional until benchmarks/test_bench_bank.py has been run on a GPU.

Adapter ids: an integer tensor shaped x.shape[:-1] (one id per row) or (x.shape[0],) (one per
sequence). −1 selects the base layer. Out-of-range ids are an error, never a wrong adapter:
on CPU they raise ValueError before anything runs (eagerly; under torch.compile the device-side
check below, so that the graph does not break); on CUDA checking them on the host would
cost a synchronisation per layer, so the op queues a device-side assertion instead
(torch._assert_async: no host sync, CUDA-graph capturable; a bad id fails the step with a
device-side assert), and every kernel reads nothing for an id outside [0, n_adapters).
AdapterBank.activate validates ids once per batch on the host, with a clear message, and
its layers skip the per-layer device assertion: on the decode path a bank layer is then one
kernel launch (one_pass reads b as stored and folds scaling into s in registers).
"""
import torch
import torch.nn.functional as F

from svk.ops import _checks, _dispatch
from svk.ops._common import add_up_projection, cast, input_side_grads
from svk.ops._library import differentiable_op

ONE_PASS_MAX_ROWS = 256
_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _valid_rows(ids, n_adapters):
    return (ids >= 0) & (ids < n_adapters)


def _gather(cores, ids):
    """cores[id_i] in fp32 for every row (M, r, r), exactly zero for rows outside [0, n)
    whatever cores[0] holds (a NaN there must not reach base-model rows: where, not ×0)."""
    valid = _valid_rows(ids, cores.shape[0])
    # Gather first, then convert: converting the whole bank would copy every adapter.
    gathered = cores[torch.where(valid, ids, 0)].float()
    return torch.where(valid[:, None, None], gathered, 0.0)


def _core_rows(p, cores, ids, strategy, *, transpose=False):
    """u_i = p_i·cores[id_i]ᵀ (transpose: p_i·cores[id_i]) in fp32; zero rows for id −1."""
    if strategy == "native":
        from svk import _native
        return _native.gather_core(p, cores, ids, transpose)
    if strategy in ("fused", "one_pass"):
        from svk import kernels  # noqa: F401
        from svk.kernels.gather_core import gather_core
        return gather_core(p, cores, ids, transpose=transpose)
    gathered = _gather(cores, ids)
    if not transpose:
        gathered = gathered.transpose(1, 2)
    return torch.bmm(p.float()[:, None, :], gathered)[:, 0]


def _forward(x, weight, a, s, b, bias, cores, ids, scaling, strategy):
    """Returns (y, t): y in x's dtype, t = x·aᵀ in fp32 (saved for backward)."""
    if strategy == "one_pass":
        from svk.kernels.xw_plus_xa_gather_core_b import xw_plus_xa_gather_core_b
        return xw_plus_xa_gather_core_b(x, weight, a, s, cores, ids, b, bias, scaling=scaling)
    if strategy == "fused":
        from svk import kernels
        from svk.kernels.x_at_gather_core import x_at_gather_core
        t, u = x_at_gather_core(x, a, s, cores, ids)
        return kernels.xw_plus_ub(x, weight, u, b.float() * scaling, bias), t
    t = cast(F.linear(x, cast(a, x.dtype)), torch.float32)
    u = _core_rows(t * cast(s, torch.float32), cores, ids, strategy)
    # F.linear gives a fresh tensor: the rank-r term adds in place.
    return add_up_projection(F.linear(x, weight, bias), u, b, None, scaling), t


def _backward(dy, x, weight, a, s, b, bias, cores, ids, t, scaling, strategy, needs):
    """Gradients of (x, weight, a, s, b, bias, cores, adapter_ids).

    With ĝ = dy and valid_i = [0 ≤ id_i < n]:
      du = valid ⊙ scaling·dy·b            (M, r)  one pass over dy
      dp_i = du_i·cores[id_i] ;  dt = dp ⊙ s ;  ds = Σ_i dp_i ⊙ t_i
      dcores[n] = Σ_{i: id_i = n} du_iᵀ·p_i  (a scatter-add of r×r outer products)
      dx = dy·W + dt·a ;  da = dtᵀ·x ;  db = scaling·dyᵀ·u ;  dW = dyᵀ·x ;  dbias = Σ_i dy_i
    dcores uses index_add_: on CUDA its float atomics make the summation order (and so the
    last bits) vary between runs; the result is exact up to that rounding.
    """
    need_x, need_w, need_a, need_s, need_b, need_bias, need_cores, _ = needs
    sf = cast(s, torch.float32)
    triton_path = strategy in ("fused", "one_pass")
    valid = _valid_rows(ids, cores.shape[0])
    if triton_path:
        from svk import kernels
        du, _ = kernels.x_at(dy, b.float() * scaling, a_transposed=True)
    else:
        du = cast(dy @ cast(b, dy.dtype), torch.float32)
        if scaling != 1.0:
            du = du.mul_(scaling)
    # Rows with id −1 contribute to no adapter's gradient, even when they hold inf/NaN:
    # select (where), never multiply by a zero mask.
    du = torch.where(valid[:, None], du, 0.0)
    p = torch.where(valid[:, None], t * sf, 0.0)
    grads = [None] * 8
    dp = _core_rows(du, cores, ids, strategy, transpose=True) if (
        need_x or need_a or need_s) else None
    dt = dp * sf if dp is not None else None
    grads[0], grads[1], grads[2] = input_side_grads(
        dy, x, weight, a, dt, need_x=need_x, need_w=need_w, need_a=need_a, triton=triton_path)
    if need_s:
        grads[3] = cast((dp * t).sum(0), s.dtype)
    if need_b:
        u = _core_rows(p, cores, ids, strategy)
        grads[4] = cast(cast(dy.t() @ cast(u, dy.dtype), torch.float32) * scaling, b.dtype)
    if need_bias:
        grads[5] = dy.sum(0)
    if need_cores:
        grads[6] = _cores_grad(du, p, ids, valid, cores)
    return grads


def _cores_grad(du, p, ids, valid, cores):
    """dcores[n] = Σ_{i: id_i = n} du_iᵀ·p_i, dense like cores (autograd needs its shape) and
    in cores' dtype, non-zero only at the adapters in the batch.

    Rows are grouped by id without a host synchronisation (sort, then a running group index),
    each group's outer products summed in fp32 into an (M, r, r) buffer, and the sums added to
    the zero gradient once per adapter: the only memory besides the gradient itself is
    O(M·r²), and an adapter's gradient is rounded to cores' dtype once. index_add_ on CUDA
    uses float atomics, so the last bits of a group's sum may vary between runs."""
    sorted_ids, perm = torch.sort(torch.where(valid, ids, -1))
    new_group = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group = torch.cumsum(new_group, 0) - 1                       # group of each sorted row
    sums = torch.zeros((du.shape[0],) + cores.shape[1:], device=du.device,
                       dtype=torch.promote_types(cores.dtype, torch.float32))
    sums.index_add_(0, group, cast(du[perm][:, :, None] * p[perm][:, None, :], sums.dtype))
    # Every group's id (−1 rows form their own group; their sums are zero and go to slot 0,
    # adding nothing). Groups past the last real one stay at id 0 with zero sums.
    group_ids = torch.zeros_like(sorted_ids).scatter_(0, group, sorted_ids.clamp(min=0))
    dcores = torch.zeros_like(cores)
    return dcores.index_add_(0, group_ids, cast(sums, cores.dtype))


sv_bank_linear_op = differentiable_op(
    "sv_bank_linear",
    args=("x", "weight", "a", "s", "b", "bias", "cores", "adapter_ids"),
    optional=("bias",),
    scalars=(("scaling", "float"),),
    extras=("t",),
    forward=_forward,
    backward=_backward,
    fake_extras=lambda x, weight, a, *_: [((x.shape[0], a.shape[0]), torch.float32)],
)


def _check_adapter_ids(adapter_ids, x, n_adapters, device_check=True):
    """Returns the ids flattened to one int64 per row of x.reshape(-1, in).

    Layout: batch first. Ids shaped x.shape[:-1] give one id per row; ids shaped
    (x.shape[0],) give one id per sequence, sequences along x's first dimension (the layout
    of Hugging Face models). A sequence-first x has to pass one id per row."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be an integer torch.Tensor, got "
                        f"{type(adapter_ids).__name__}")
    if adapter_ids.dtype not in _INTEGER_DTYPES:
        raise TypeError(f"adapter_ids must be an integer tensor (int8/16/32/64, uint8), got "
                        f"dtype {adapter_ids.dtype}")
    if adapter_ids.device != x.device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}; "
                         "all tensors of one call must be on the same device")
    rows = x.shape[:-1]
    ids_shape = adapter_ids.shape
    if ids_shape == rows:
        flat = adapter_ids.reshape(-1)
    elif x.dim() >= 2 and ids_shape == (x.shape[0],):
        view = adapter_ids.view(x.shape[0], *([1] * (x.dim() - 2)))
        flat = view.expand(rows).reshape(-1)
    else:
        expected = (f"{tuple(rows)} (one id per row of x) or {(x.shape[0],)} (one per "
                    "sequence, batch first)" if x.dim() >= 2 else f"{tuple(rows)} (one per row)")
        raise ValueError(f"adapter_ids must have shape {expected}, got {tuple(ids_shape)} for "
                         f"x of shape {tuple(x.shape)}")
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    if flat.numel() == 0:
        return flat
    if n_adapters == 0:
        raise ValueError("cores holds 0 adapters: pass at least one (n_adapters, r, r) core, "
                         "or use the base layer alone")
    if not device_check:        # validated by the caller (AdapterBank.activate) once per batch
        return flat
    device_type = flat.device.type
    if device_type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(flat.min()), int(flat.max())
        if low < -1 or high >= n_adapters:
            bad = low if low < -1 else high
            raise ValueError(f"adapter_ids holds {bad}, outside [-1, {n_adapters - 1}]: cores has "
                             f"{n_adapters} adapters and -1 selects the base layer")
    elif device_type != "meta":
        ok = ((flat >= -1) & (flat < n_adapters)).all()
        torch._assert_async(ok, f"sv_bank_linear: adapter_ids outside [-1, {n_adapters - 1}]")
    return flat


def _resolve(backend, x, rows, rank):
    if backend == "native":
        from svk import _native
        ok, reason = _native.status()["gather_core_" + ("cuda" if x.is_cuda else "cpu")]
        if not ok and not _native.ensure_built(x.device):
            raise RuntimeError(f"backend='native' cannot run: {_native.status()}")
        return "native"
    if backend == "auto" and x.device.type != "cuda" and _dispatch.SETTINGS.backend == "auto":
        return "torch"
    if backend == "auto" and x.device.type == "cuda" and _dispatch.SETTINGS.backend == "auto" \
            and not _dispatch.triton_usable(x.device)[0]:
        from svk import _native
        return "native" if _native.loaded(x.device) else "torch"
    backend = _dispatch.resolve_backend(backend, x)
    if backend == "torch":
        return "torch"
    from svk.kernels._common import MAX_EPILOGUE_RANK, rank_pad
    forced = _dispatch.forced_strategy()
    if forced == "one_pass" and rank_pad(rank) > MAX_EPILOGUE_RANK:
        raise ValueError(f"SVK_STRATEGY=one_pass needs rank ≤ {MAX_EPILOGUE_RANK}")
    if forced in ("one_pass", "fused"):
        return forced
    # "merged" has no bank form (every row has its own W_eff); it means "fused" here.
    if forced is None and rows <= ONE_PASS_MAX_ROWS and rank_pad(rank) <= MAX_EPILOGUE_RANK:
        return "one_pass"
    return "fused"


def sv_bank_linear(x, weight, a, s, b, cores, adapter_ids, *, bias=None, scaling=1.0,
                   backend="auto"):
    """y_i = x_i·Wᵀ + bias + scaling·((x_i·aᵀ ⊙ s)·cores[id_i]ᵀ)·bᵀ per row (DESIGN.md §2).

    x (..., in); weight (out, in) and bias (out,) in x's dtype; a (r, in), s (r,), b (out, r)
    the frozen LoRA-XS factors shared by every adapter; cores (n_adapters, r, r) one trainable
    core per adapter, in any float dtype; adapter_ids an integer tensor of shape x.shape[:-1]
    (one id per row) or (x.shape[0],) (one per sequence), −1 = the base layer's output.
    Products accumulate in fp32; y has x's dtype. Differentiable in every float tensor that
    requires grad: dcores scatters each row's outer product du_iᵀ·p_i into cores[id_i], so one
    mixed batch trains many users' adapters. Saves x and one (M, r) fp32 tensor for backward.
    backend: "auto", "triton", "torch" or "native" (compiled gathered-core op, see svk.info).
    """
    return _sv_bank_linear(x, weight, a, s, b, cores, adapter_ids, bias=bias, scaling=scaling,
                           backend=backend)


def _sv_bank_linear(x, weight, a, s, b, cores, adapter_ids, *, bias=None, scaling=1.0,
                    backend="auto", device_check=True):
    """sv_bank_linear, plus device_check: on CUDA, queue the device-side id assertion
    (AdapterBank passes False: it validated the ids on the host once for the whole batch)."""
    x, weight, bias = _dispatch.autocast_base(x, weight, bias)
    check(x, weight, a, s, b, cores, bias)
    return run(x, weight, a, s, b, cores, adapter_ids, bias, _checks.scaling(scaling), backend,
               device_check)


def check(x, weight, a, s, b, cores, bias):
    """Every tensor check of sv_bank_linear except the ids (a bank layer runs it once)."""
    out_features, in_features = _checks.base_layer(x, weight, bias)
    for name, value in (("a", a), ("s", s), ("b", b), ("cores", cores)):
        _checks.tensor(name, value)
    if a.dim() != 2 or a.shape[1] != in_features:
        raise ValueError(f"a must have shape (r, in={in_features}), got {tuple(a.shape)}")
    r = a.shape[0]
    if r == 0:
        raise ValueError("a has rank 0; the adapter needs r ≥ 1")
    _checks.shape("s", s, (r,), "r")
    _checks.shape("b", b, (out_features, r), "out, r")
    if cores.dim() != 3 or tuple(cores.shape[1:]) != (r, r):
        raise ValueError(f"cores must have shape (n_adapters, r={r}, r={r}), got "
                         f"{tuple(cores.shape)}")
    _checks.same_device(x, weight=weight, a=a, s=s, b=b, bias=bias, cores=cores)


def run(x, weight, a, s, b, cores, adapter_ids, bias, scaling, backend, device_check=True):
    """sv_bank_linear on checked tensors: the ids' check, backend choice, one op call."""
    if backend not in _BANK_BACKENDS:
        raise ValueError(f"backend must be one of {_BANK_BACKENDS}, got {backend!r}")
    ids = _check_adapter_ids(adapter_ids, x, cores.shape[0], device_check)
    flat = x.dim() != 2
    x2 = x.reshape(-1, weight.shape[1]) if flat else x
    strategy = _resolve(backend, x, x2.shape[0], a.shape[0])
    y = sv_bank_linear_op(x2, weight, a, s, b, bias, cores, ids, scaling, strategy)
    return y.reshape(*x.shape[:-1], weight.shape[0]) if flat else y


_BANK_BACKENDS = _dispatch.BACKENDS + ("native",)
