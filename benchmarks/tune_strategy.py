"""Measures sv_linear's three Triton strategies on this GPU and records the cut-offs dispatch uses.

    python benchmarks/tune_strategy.py [IN,OUT,R ...]   # CUDA only; bash benchmarks/gpu.sh tune

Shapes on the command line replace SHAPES (132 timed points with autotuning may outrun a
10-minute call: run a shape or two per call; each call's cut-offs cover its shapes only).

For DESIGN.md §7's shapes (in, out, r) and row counts M from decode to 16k tokens, times a
training step's forward + backward (LoRA-XS: the core trains, x needs its gradient; bf16) with
each strategy forced through SVK_STRATEGY (medians of triton.testing.do_bench). Writes every
median to benchmarks/results/strategy-<gpu>.json and the derived cut-offs into
svk/ops/strategy_cutoffs.json under torch's name for the GPU, where
svk.ops._dispatch.choose_strategy finds them:

  one_pass_max_rows  the largest measured M up to which one_pass beat both others at every
                     shape (0: never)
  merged_min_ratio   the smallest M·(in+out)/(in·out) from which merged beat fused at every
                     measured point above it (null: merged never won at the largest sizes)
"""
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.utils import force_strategy  # noqa: E402

SHAPES = [(4096, 4096, 16), (4096, 4096, 64), (4096, 11008, 64), (11008, 4096, 64)]
ROWS = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
STRATEGIES = ("one_pass", "fused", "merged")


def time_strategies(shapes=SHAPES, rows=ROWS, dtype=torch.bfloat16, on_shape=None):
    """[{in, out, r, M, strategy, ms}] for every shape, row count and strategy; on_shape(results)
    after each shape, so a run cut short keeps what it measured."""
    import triton.testing

    import svk
    results = []
    for in_f, out_f, r in shapes:
        g = torch.Generator(device="cuda").manual_seed(0)
        weight = torch.randn(out_f, in_f, device="cuda", generator=g).to(dtype) * in_f ** -0.5
        a = torch.randn(r, in_f, device="cuda", generator=g) * in_f ** -0.5
        s = torch.rand(r, device="cuda", generator=g)
        b = torch.randn(out_f, r, device="cuda", generator=g) * 0.1
        core = torch.zeros(r, r, device="cuda").requires_grad_()
        for m in rows:
            x = torch.randn(m, in_f, device="cuda", generator=g).to(dtype).requires_grad_()
            dy = torch.randn(m, out_f, device="cuda", generator=g).to(dtype)
            for strategy in STRATEGIES:
                force_strategy(strategy)      # svk reads SVK_STRATEGY once: set and reload

                def step():
                    y = svk.sv_linear(x, weight, a, s, b, core=core)
                    torch.autograd.grad(y, (x, core), dy)
                ms = triton.testing.do_bench(step, quantiles=[0.5])
                results.append(dict(in_features=in_f, out_features=out_f, rank=r, M=m,
                                    strategy=strategy, ms=ms))
                print(f"in {in_f} out {out_f} r {r} M {m:>6} {strategy:>8}: {ms:.4f} ms",
                      flush=True)
        if on_shape is not None:
            on_shape(results)
    force_strategy(None)
    return results


def cutoffs_from_timings(results):
    """The two cut-offs (see the module docstring) from time_strategies' records."""
    points = {}
    for rec in results:
        key = (rec["in_features"], rec["out_features"], rec["rank"], rec["M"])
        points.setdefault(key, {})[rec["strategy"]] = rec["ms"]
    one_pass_max = 0
    for m in sorted({key[3] for key in points}):
        at_m = [t for key, t in points.items() if key[3] == m and "one_pass" in t]
        if at_m and all(t["one_pass"] <= min(v for k, v in t.items() if k != "one_pass")
                        for t in at_m):
            one_pass_max = m
        else:
            break
    # Shapes share ratios (4096→11008 and 11008→4096, r 16 and r 64 at the same M): a ratio
    # counts as won only if merged won at every point that has it.
    wins = {}
    for (i, o, _, m), t in points.items():
        if {"merged", "fused"} <= t.keys():
            wins.setdefault(m * (i + o) / (i * o), []).append(t["merged"] <= t["fused"])
    merged_min = None
    for ratio in sorted(wins, reverse=True):
        if not all(wins[ratio]):
            break
        merged_min = ratio
    return {"one_pass_max_rows": one_pass_max, "merged_min_ratio": merged_min}


def main():
    if not torch.cuda.is_available():
        raise SystemExit("tune_strategy measures the Triton strategies: it needs a CUDA GPU")
    import triton
    name = torch.cuda.get_device_name()
    raw = ROOT / "benchmarks" / "results" / f"strategy-{name.replace(' ', '-')}.json"

    def save(results, found=None):
        raw.write_text(json.dumps(dict(gpu=name, torch=torch.__version__,
                                       triton=triton.__version__, dtype="bfloat16",
                                       results=results, cutoffs=found), indent=1))
    shapes = [tuple(int(v) for v in arg.split(",")) for arg in sys.argv[1:]] or SHAPES
    results = time_strategies(shapes=shapes, on_shape=save)
    found = cutoffs_from_timings(results)
    save(results, found)
    table_file = ROOT / "svk" / "ops" / "strategy_cutoffs.json"
    table = json.loads(table_file.read_text())
    table["devices"][name] = dict(found, measured=str(raw.relative_to(ROOT)),
                                  torch=torch.__version__, triton=triton.__version__)
    table_file.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{name}: {found}\nraw medians: {raw}\ncut-offs: {table_file}")


if __name__ == "__main__":
    main()
