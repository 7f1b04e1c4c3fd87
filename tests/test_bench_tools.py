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
