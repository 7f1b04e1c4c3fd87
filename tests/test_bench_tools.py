"""The benchmark helpers that turn measurements into claims: the work counts behind the floors,
and the plots of a results file."""
import json

import pytest

from benchmarks.floors import linear_adapter_work


def test_linear_adapter_work_counts_every_product():
    m, k, n, r, e = 3, 5, 7, 2, 2
    fwd = 2 * m * k * n + 2 * m * k * r + 2 * m * n * r
    fwd_bytes = (m * k + n * k + m * n) * e + (r * k + n * r) * 4
    assert linear_adapter_work(m, k, n, r, e, mode="fwd") == (fwd, fwd_bytes)
    core = 2 * m * r * r
    assert linear_adapter_work(m, k, n, r, e, mode="fwd", core=True)[0] == fwd + core
    # Backward of a frozen W with x needing its gradient, then a and b training.
    bwd = 2 * m * k * n + 2 * m * k * r + 2 * m * n * r
    bwd_bytes = (m * n + n * k + m * k) * e + (r * k + n * r) * 4
    assert linear_adapter_work(m, k, n, r, e, mode="fwd+bwd") == (fwd + bwd,
                                                                  fwd_bytes + bwd_bytes)
    flops, nbytes = linear_adapter_work(m, k, n, r, e, mode="fwd+bwd", grads=("a", "b"))
    assert flops == fwd + bwd + 2 * m * k * r + 2 * m * n * r
    assert nbytes == fwd_bytes + bwd_bytes + m * k * e
    # LoRA-XS: the core in both passes (2mr² each) and its own gradient; out_scale as db.
    assert linear_adapter_work(m, k, n, r, e, mode="fwd+bwd", core=True, grads=("core",))[0] \
        == fwd + bwd + 3 * core
    assert linear_adapter_work(m, k, n, r, e, mode="fwd+bwd", out_scale=True)[0] \
        == linear_adapter_work(m, k, n, r, e, mode="fwd+bwd", grads=("b",))[0]


def test_plot_writes_one_png_per_family(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot import plot

    def bench(group, provider, ms, **extra):
        return {"group": group, "name": f"t[{provider}]", "stats": {"median": ms / 1e3},
                "extra_info": {"provider": provider, "cpu": "test", **extra}}
    floors = dict(flop_floor_ms=0.5, byte_floor_ms=0.2)
    results = [bench("sv_linear fwd lora_xs M7", p, ms, **floors)
               for p, ms in [("base", 1.0), ("reference", 2.0), ("svk", 1.1)]]
    results += [bench(f"bank layer decode M1 r16 resident{n}", p, ms)
                for n in (1, 100) for p, ms in [("base", 1.0), ("svk", 1.05)]]
    path = tmp_path / "run.json"
    path.write_text(json.dumps(results))
    written = plot(path)
    assert sorted(p.rsplit("-", 1)[-1] for p in map(str, written)) == ["layer.png",
                                                                       "sv_linear.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in written)


def _timings(points):
    """time_strategies-style records from {(in, out, r, M): {strategy: ms}}."""
    return [dict(in_features=i, out_features=o, rank=r, M=m, strategy=s, ms=ms)
            for (i, o, r, m), by in points.items() for s, ms in by.items()]


def test_cutoffs_from_timings():
    from benchmarks.tune_strategy import cutoffs_from_timings
    # One shape 100×100: ratio M·(in+out)/(in·out) = M/50.
    points = {(100, 100, 16, 16): {"one_pass": 1.0, "fused": 2.0, "merged": 5.0},
              (100, 100, 16, 64): {"one_pass": 2.0, "fused": 2.5, "merged": 5.0},
              (100, 100, 16, 128): {"one_pass": 4.0, "fused": 3.0, "merged": 5.0},
              (100, 100, 16, 256): {"one_pass": 1.0, "fused": 6.0, "merged": 5.9},
              (100, 100, 16, 512): {"fused": 12.0, "merged": 8.0}}
    # one_pass wins at 16 and 64, loses at 128: 64, whatever happens at 256. merged wins at
    # M = 256 and 512 (ratios 5.12, 10.24) and loses at 128: from 5.12.
    assert cutoffs_from_timings(_timings(points)) == {"one_pass_max_rows": 64,
                                                      "merged_min_ratio": 256 / 50}
    # A second rank at the same ratios: merged must win at both to count (a tie of ratios).
    points[(100, 100, 64, 512)] = {"fused": 12.0, "merged": 8.0}
    points[(100, 100, 64, 256)] = {"fused": 6.0, "merged": 6.5}
    assert cutoffs_from_timings(_timings(points))["merged_min_ratio"] == 512 / 50
    points[(100, 100, 16, 512)]["merged"] = 13.0
    assert cutoffs_from_timings(_timings(points))["merged_min_ratio"] is None
    # A second shape where one_pass loses at 16 rows: never one_pass.
    points[(200, 100, 16, 16)] = {"one_pass": 3.0, "fused": 2.0, "merged": 9.0}
    assert cutoffs_from_timings(_timings(points))["one_pass_max_rows"] == 0


def test_choose_strategy_reads_measured_cutoffs(monkeypatch):
    from svk.ops import _dispatch
    monkeypatch.delenv("SVK_STRATEGY", raising=False)
    assert json.loads(_dispatch.CUTOFFS_FILE.read_text())["devices"] == _dispatch.MEASURED
    monkeypatch.setattr(_dispatch, "_LIMITS", {})
    assert _dispatch.choose_strategy(256, 64, 64, 16, 128) == "one_pass"     # the defaults
    assert _dispatch.choose_strategy(257, 64, 64, 16, 128) == "merged"       # 257·128 ≥ 4·64²
    monkeypatch.setattr(_dispatch, "MEASURED", {
        "cpu": {"one_pass_max_rows": 32, "merged_min_ratio": None}})
    monkeypatch.setattr(_dispatch, "_LIMITS", {})
    choose = lambda m: _dispatch.choose_strategy(m, 64, 64, 16, 128)  # noqa: E731
    assert choose(32) == "one_pass" and choose(33) == "fused"
    assert choose(10 ** 6) == "fused"                        # merged never won here


def test_choose_strategy_traces_under_torch_compile():
    """torch.compile(fullgraph=True) of the Triton path calls choose_strategy while tracing:
    no file or device query may happen inside the graph."""
    import torch
    from svk.ops import _dispatch

    def pick(x):
        strategy = _dispatch.choose_strategy(x.shape[0], 64, 64, 16, 128, x.device)
        return x * (2.0 if strategy == "one_pass" else 3.0)
    x = torch.ones(8, 4)
    torch._dynamo.reset()
    assert torch.compile(pick, fullgraph=True, backend="eager")(x).sum().item() == 64.0
