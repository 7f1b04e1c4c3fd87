"""Compile every svk Triton kernel for a GPU architecture, on a machine without a GPU.

    python -m svk.kernels.compile_check --arch 90            # H100/H200 (sm_90a)
    python -m svk.kernels.compile_check --arch 90 --quick    # one dtype, what CI runs

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but never compiles them:
tl.dot's shape rules, shared-memory budgets, register pressure and API changes between Triton
versions only show up in Triton's real compiler. This module runs the ops (svk.sv_linear,
sv_mixture_linear, sv_bank_linear; forward and backward; every strategy) on CPU tensors with
a stand-in driver whose target is the chosen GPU, and turns every kernel launch into a
compile-only warm-up of every autotune config the kernel's pruning keeps. Nothing executes: outputs are uninitialised
memory, which is fine because only the launches matter.

For each compiled (kernel, specialisation, config) it reports registers, spilled bytes
(cuobjdump's STACK + LOCAL) and dynamic shared memory against the architecture's limits, and
reads the kernel's TTIR for pointer offsets computed in 32 bits (a `tt.addptr` with an i32
offset: (M − 1)·stride past 2³¹ would wrap into other memory). Exit status
1 when any config the autotuner would try fails to compile, computes a 32-bit pointer offset,
or uses more shared memory than
the kernel's pruning estimated (the estimate must bound the compiler, or the pruning lets
impossible configs through). --one-config compiles only the first config each launch would
try (what the offset check needs; a few seconds per kernel). Configs that need more shared memory than the GPU has (the
autotuner skips them at run time, after compiling them) and configs that spill registers are
listed; --strict fails on them too.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("compile_check needs Triton's compiler: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Largest dynamic shared memory one block may opt into, by compute capability (CUDA guide).
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}


# The case _drive is running, recorded with every compile.
_CASE = {"label": ""}


class CompileOnlyDriver(DriverBase):
    """Just enough of a driver for JITFunction to specialise and compile: device 0, stream 0,
    a fixed target. Launching through it is impossible (there is no device)."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing can run")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _resources(kernel):
    """(registers, spilled bytes) of a compiled kernel, from cuobjdump on its cubin: spills
    live in the stack frame (STACK), local arrays in LOCAL; Triton kernels use neither
    unless registers ran out."""
    from triton.backends.nvidia.compiler import get_ptxas
    cuobjdump = os.path.join(os.path.dirname(get_ptxas(90).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}
    return usage.get("REG"), usage.get("STACK", 0) + usage.get("LOCAL", 0)


# `%p = tt.addptr %base, %offset : <pointer type>, <offset type> loc(...)`
_ADDPTR = re.compile(r"tt\.addptr [^:\n]*: [^,\n]*, (tensor<[^>\n]*>|i\d+)")


def narrow_offsets(ttir):
    """The offset types of every tt.addptr in a kernel's TTIR that adds a 32-bit offset."""
    return [kind for kind in _ADDPTR.findall(ttir) if kind.endswith("i32>") or kind == "i32"]


def _specialisation(args):
    """A short, readable key for what Triton specialises on: dtypes and the int arguments."""
    parts = []
    for value in args:
        if isinstance(value, torch.Tensor):
            parts.append(str(value.dtype).replace("torch.", ""))
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append("1" if value == 1 else ("16k" if value % 16 == 0 else "i"))
    return ",".join(parts)


@contextlib.contextmanager
def compile_only(arch, records, one_config=False):
    """Every kernel launch inside compiles all its configs for `arch` (or only the first the
    autotuner would try, one_config) and appends a record."""
    import svk.kernels._common as common
    import svk.kernels.x_at_router as router
    from svk.ops import _dispatch

    saved = dict(jit_run=JITFunction.run, tune_run=Autotuner.run,
                 usable=_dispatch.triton_usable, check=common.check_device,
                 sm_count=router._sm_count, fuse_t=router._fuse_t_by_default, driver=getattr(_driver, "_active", None))
    current = {}

    def jit_run(self, *args, grid, warmup, **kwargs):
        constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
        record = dict(kernel=self.__name__, case=_CASE["label"], spec=_specialisation(args),
                      config={**current.get("config", {}), **constexprs},
                      shared_estimate=current.get("estimate"))
        try:
            kernel = saved["jit_run"](self, *args, grid=grid, warmup=True, **kwargs)
            record.update(shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
                          num_stages=kernel.metadata.num_stages)
            record["registers"], record["spilled_bytes"] = _resources(kernel)
            record["narrow_offsets"] = narrow_offsets(kernel.asm["ttir"])
            # Float narrowings (fp32 → x's dtype); the K loops should have none (as_operand).
            record["truncf"] = kernel.asm["ttir"].count("arith.truncf")
        except Exception as error:  # a config that does not compile is the finding
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        records.append(record)

    def tune_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        grid = kwargs.pop("grid")
        self.nargs = dict(zip(self.arg_names, args))
        kept = self.prune_configs(kwargs)   # what the autotuner would benchmark
        estimate = getattr(self.early_config_prune, "estimate", None)
        for config in kept[:1] if one_config else kept:
            current["config"] = dict(config.kwargs, num_warps=config.num_warps,
                                     num_stages=config.num_stages)
            current["estimate"] = estimate(config, self.nargs, **kwargs) if estimate else None
            self.fn.run(*args, grid=grid, warmup=True, **kwargs, **config.all_kwargs())
        self.nargs = None
        current.clear()

    _driver.set_active(CompileOnlyDriver(arch))
    common.SHARED_MEMORY_LIMIT = SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    JITFunction.run, Autotuner.run = jit_run, tune_run
    _dispatch.triton_usable = lambda device: (True, "")
    router._sm_count = lambda index: 132
    modules = [m for name, m in sys.modules.items() if name.startswith("svk.kernels.")]
    checks = {m: m.check_device for m in modules if hasattr(m, "check_device")}
    for module in checks:
        # CPU tensors stand for the GPU's: no device check, no device switch.
        module.check_device = lambda *tensors, **named: contextlib.nullcontext()
    try:
        yield
    finally:
        common.SHARED_MEMORY_LIMIT = None
        _driver._active = saved["driver"]  # None: Triton picks the real driver when asked
        JITFunction.run, Autotuner.run = saved["jit_run"], saved["tune_run"]
        _dispatch.triton_usable = saved["usable"]
        router._sm_count, router._fuse_t_by_default = saved["sm_count"], saved["fuse_t"]
        for module, check in checks.items():
            module.check_device = check


def _cases(quick):
    """(dtype, tf32, (M, K, N, r)) to run. What changes the compiled code is the dtype, TF32,
    the padded rank (16, 64, 128, > 128) and the constexpr flags each op sets; integer
    divisibility by 16 changes vector widths, so one odd shape is compiled too."""
    aligned = [(torch.bfloat16, False), (torch.float16, False), (torch.float32, False),
               (torch.float32, True)]
    if quick:
        return [(torch.bfloat16, False, (64, 256, 128, 16))]
    cases = [(dtype, tf32, (64, 256, 128, r)) for dtype, tf32 in aligned for r in (16, 64)]
    return cases + [(torch.bfloat16, False, (64, 256, 128, 128)),
                    (torch.bfloat16, False, (7, 67, 33, 5)),
                    (torch.bfloat16, False, (33, 96, 80, 150))]


def _set_tf32(on):
    """TF32 for fp32 matmuls through the fp32_precision API where torch has it (mixing it
    with the legacy allow_tf32 makes reads raise), else allow_tf32."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if on else "ieee"
    else:
        matmul.allow_tf32 = on


def _strategy(value):
    """Forces (or, with None, releases) the Triton strategy; the dispatcher may read its
    environment once, so it is told to read it again where it can."""
    from svk.ops import _dispatch
    if value is None:
        os.environ.pop("SVK_STRATEGY", None)
    else:
        os.environ["SVK_STRATEGY"] = value
    getattr(_dispatch, "reload_settings", lambda: None)()


def _drive(cases):
    """Runs every op, forward and backward, through every strategy for each case."""
    import svk
    import svk.kernels.x_at_router as router

    g = torch.Generator().manual_seed(0)
    for dtype, tf32, (m, k, n, r) in cases:
        _set_tf32(tf32)
        _CASE["label"] = (f"{str(dtype).replace('torch.', '')}{'+tf32' if tf32 else ''} "
                          f"M={m} K={k} N={n} r={r}")
        print("compiling", _CASE["label"], flush=True)
        x = torch.randn(m, k, generator=g).to(dtype).requires_grad_()
        w = torch.randn(n, k, generator=g).to(dtype)
        bias = torch.randn(n, generator=g).to(dtype)
        a = torch.randn(r, k, generator=g).requires_grad_()
        s = torch.randn(r, generator=g).requires_grad_()
        b = torch.randn(n, r, generator=g).requires_grad_()
        core = torch.randn(r, r, generator=g).requires_grad_()
        for strategy in ("fused", "one_pass", "merged"):
            if strategy == "one_pass" and r > 128:
                continue
            if strategy == "merged" and dtype != torch.float32:
                continue    # the dispatcher refuses merged for 16-bit weights (issue 13.1)
            _strategy(strategy)
            for c in (core, None):
                y = svk.sv_linear(x, w, a, s, b, bias=bias, core=c, backend="triton")
                y.float().sum().backward()
            if strategy != "merged":
                # Adapter dropout: Philox in the K loop (x_at, one pass), the masked r steps
                # of dx, the dropped x for da (merged takes no dropout: it runs fused).
                y = svk.sv_linear(x, w, a, s, b, bias=bias, core=core, backend="triton",
                                  dropout=0.1)
                y.float().sum().backward()
        _strategy(None)
        heads = 5
        lambdas = torch.randn(heads, r, generator=g).requires_grad_()
        gate_in = torch.randn(r, generator=g).requires_grad_()
        gate_out = torch.randn(heads, generator=g).requires_grad_()
        for fuse_t in (True, False):   # t inside the router kernel, or from x_at first
            router._fuse_t_by_default = lambda x: fuse_t
            for dropout in (0.0, 0.1):
                y = svk.sv_mixture_linear(x, w, a, lambdas, gate_in, gate_out, b, bias=bias,
                                          backend="triton", dropout=dropout)
                y.float().sum().backward()
        if r <= 64:
            cores = torch.randn(3, r, r, generator=g)
            ids = torch.randint(-1, 3, (m,), generator=g)
            # The gathered r×r step on its own (the bank's backward), both orientations.
            from svk.kernels.gather_core import gather_core
            for transpose in (False, True):
                gather_core(torch.randn(m, r, generator=g), cores, ids, s=s.detach(),
                            transpose=transpose)
            for strategy in ("one_pass", "fused"):
                _strategy(strategy)
                with torch.no_grad():
                    svk.sv_bank_linear(x, w, a, s, b, cores, ids, bias=bias,
                                       backend="triton")
            _strategy(None)
    _set_tf32(False)


def problems(records, arch):
    limit = SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    found = []
    for rec in records:
        if "error" in rec:
            found.append((rec, ("error", rec["error"])))
        elif rec.get("narrow_offsets"):
            found.append((rec, ("offsets", f"{len(rec['narrow_offsets'])} pointer offsets in 32 "
                                           f"bits ({', '.join(rec['narrow_offsets'][:3])})")))
        elif rec.get("shared_estimate") is not None and rec["shared"] > rec["shared_estimate"]:
            found.append((rec, ("estimate", f"the pruning estimated {rec['shared_estimate']} B "
                                            f"of shared memory, the compiler used "
                                            f"{rec['shared']}")))
        elif rec["shared"] > limit:
            found.append((rec, ("shared", f"needs {rec['shared']} B of shared memory, sm_{arch} "
                                          f"has {limit}")))
        elif rec.get("spilled_bytes"):
            found.append((rec, ("spills", f"spills {rec['spilled_bytes']} B per thread "
                                          f"({rec['registers']} registers)")))
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100)")
    parser.add_argument("--quick", action="store_true", help="bf16 and one shape only")
    parser.add_argument("--rank", type=int, action="append",
                        help="only the cases of this adapter rank (repeatable)")
    parser.add_argument("--dtype", action="append", choices=["bfloat16", "float16", "float32"],
                        help="only the cases of this activation dtype (repeatable)")
    parser.add_argument("--strict", action="store_true",
                        help="shared-memory overflows and register spills fail the check too")
    parser.add_argument("--json", help="write every record to this file")
    parser.add_argument("--one-config", action="store_true",
                        help="compile only the first config of each launch (offset check)")
    parser.add_argument("--case", type=int, action="append",
                        help="only case number N of the list (0-based, repeatable): splits "
                             "the full check into runs that each fit a time limit")
    args = parser.parse_args(argv)
    cases = [c for i, c in enumerate(_cases(args.quick))
             if (not args.rank or c[2][3] in args.rank)
             and (not args.dtype or str(c[0]).replace("torch.", "") in args.dtype)
             and (not args.case or i in args.case)]
    records = []
    with compile_only(args.arch, records, one_config=args.one_config):
        _drive(cases)
    unique = {json.dumps(r, sort_keys=True): r for r in records}
    records = list(unique.values())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, triton=triton.__version__, torch=torch.__version__,
                           records=records), f, indent=1)
    by_kernel = {}
    for rec in records:
        by_kernel.setdefault(rec["kernel"], []).append(rec)
    print(f"Triton {triton.__version__}, sm_{args.arch}: {len(records)} compiled "
          f"(kernel, specialisation, config) triples")
    for name, recs in sorted(by_kernel.items()):
        ok = [r for r in recs if "error" not in r]
        regs = [r["registers"] for r in ok if r.get("registers") is not None]
        smem = [r["shared"] for r in ok]
        print(f"  {name}: {len(recs)} compiled, {len(recs) - len(ok)} failed"
              + (f", registers {min(regs)}–{max(regs)}" if regs else "")
              + (f", shared {min(smem) // 1024}–{max(smem) // 1024} KiB" if smem else ""))
    found = problems(records, args.arch)
    print("per case: configs compiled, of which spill (most bytes/thread) or overflow shared memory")
    for case in dict.fromkeys(r["case"] for r in records):
        recs = [r for r in records if r["case"] == case and "error" not in r]
        spills = [r["spilled_bytes"] for r in recs if r.get("spilled_bytes")]
        over = [r for r in found if r[0]["case"] == case and r[1][0] == "shared"]
        print(f"  {case}: {len(recs)}, {len(spills)} spill"
              + (f" (≤ {max(spills)} B)" if spills else "") + f", {len(over)} overflow")
    for rec, why in found:
        print(f"{why[0]:7} {rec['kernel']} {_brief(rec)}: {why[1]}")
    failed = [why for _, why in found if why[0] in ("error", "offsets", "estimate") or args.strict]
    return 1 if failed else 0


def _brief(rec):
    """The tunable part of a config and the flags that are on, in one short line."""
    config = rec["config"]
    tiles = "/".join(f"{k[6:]}{v}" for k, v in config.items() if k.startswith("BLOCK_"))
    flags = ",".join(k for k, v in config.items() if v is True)
    return (f"[{rec['case']}] {tiles} w{config.get('num_warps')} s{config.get('num_stages')}"
            + (f" {flags}" if flags else ""))


if __name__ == "__main__":
    sys.exit(main())
