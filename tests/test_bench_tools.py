"""The benchmark helpers that turn measurements into claims: the work counts behind the floors,
the plots of a results file, the strategy cut-offs, and the run's summary, wording, targets and
output location (benchmarks/summary.py, benchmarks/conftest.py, benchmarks/utils.py) on
hand-made results: no timing, no asserts on speed."""
import json
import os
import pathlib
import types

import pytest

from benchmarks import summary
from benchmarks.floors import linear_adapter_work
from benchmarks.utils import as_result, interleaved, median_ms, quantile

ROOT = pathlib.Path(__file__).resolve().parent.parent


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


# The run's summary ----------------------------------------------------------------------

def result(group, provider, ms, spread=0.02, **extra):
    """A result of median `ms` whose p20–p80 spread is ±spread/2 of it."""
    low, high = ms * (1 - spread / 2), ms * (1 + spread / 2)
    return {"name": f"t[{group}-{provider}]", "group": group,
            "stats": {"median": ms / 1e3, "q1": low / 1e3, "q3": high / 1e3},
            "extra_info": dict(extra, provider=provider, median_ms=ms, p20_ms=low,
                               p80_ms=high)}


# Wording ----------------------------------------------------------------------------------

def test_speed_words_slower_is_not_called_faster():
    # The old table printed ref/svk = 0.70 as "0.70× faster".
    assert summary.speed_words(0.70) == "0.70× = 1.43× slower"
    assert summary.speed_words(0.77) == "0.77× = 1.30× slower"
    assert summary.speed_words(1.3) == "1.30× faster"
    assert summary.speed_words(0.999) == "1.00× (same speed)"
    assert summary.speed_words(1.004) == "1.00× (same speed)"


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_speed_words_rejects_meaningless_ratios(bad):
    with pytest.raises(ValueError, match="speed ratio"):
        summary.speed_words(bad)


def test_fmt_time_picks_the_unit_and_never_an_exponent():
    assert summary.fmt_time(0.0961) == "96.1 µs"
    assert summary.fmt_time(28.91) == "28.9 ms"
    assert summary.fmt_time(2180.0) == "2.18 s"          # printed "2.18e+03 ms" before
    assert summary.fmt_time(0.9996) == "1000 µs"
    assert summary.fmt_number(0.00895) == "0.00895"
    assert summary.cost_words(1.714) == "1.71× base"


def test_versus_reads_as_a_sentence():
    assert summary.versus(1.0, "ref") == "as fast as ref (1.00×)"   # not "1.00× (same speed) than"
    assert summary.versus(0.5, "ref") == "0.50× = 2.00× slower than ref"


def test_verdict_needs_separate_spreads():
    fast, slow = result("g", "svk", 10.0), result("g", "reference", 13.0)
    assert summary.verdict(fast, slow) == "faster"
    assert summary.verdict(slow, fast) == "slower"
    wide = result("g", "reference", 10.5, spread=0.3)
    assert summary.verdict(fast, wide) == "even"


def test_ratio_bounds_span_both_spreads():
    a, b = result("g", "svk", 10.0, spread=0.2), result("g", "reference", 20.0, spread=0.2)
    low, high = summary.ratio_bounds(a, b)
    assert low == pytest.approx(9.0 / 22.0) and high == pytest.approx(11.0 / 18.0)


def test_spread_falls_back_to_quartiles():
    bench = result("g", "svk", 10.0)
    del bench["extra_info"]["p20_ms"], bench["extra_info"]["p80_ms"]
    bench["stats"].update(q1=0.009, q3=0.012)
    assert summary.spread_ms(bench) == pytest.approx((9.0, 12.0))
    assert summary.relative_spread(bench) == pytest.approx(0.3)


# The summary ------------------------------------------------------------------------------

def _classic_run(spread=0.02):
    g = "sv_linear fwd lora_xs M2048"
    return [result(g, "base", 25.0, spread), result(g, "reference", 30.0, spread),
            result(g, "svk", 40.0, spread)]


def test_summary_line_compares_svk_reference_and_base():
    lines = summary.summarize(_classic_run())
    assert lines[0].startswith("svk benchmark summary")
    assert lines[1] == "sv_linear fwd lora_xs M2048 (ms)"
    assert lines[2] == ("  svk 40.0 [39.6–40.4]  ref 30.0 [29.7–30.3]  base 25.0 [24.8–25.2]  "
                        "→ 0.75× = 1.33× slower than ref, 1.60× base  SLOWER")
    assert all(len(x) <= 120 for x in lines)
    assert not any("e+" in x for x in lines)
    assert not any("WARNING" in x for x in lines)


def test_noisy_run_is_flagged():
    lines = summary.summarize(_classic_run(spread=0.4))
    warning = [x for x in lines if x.startswith("WARNING noisy run")]
    assert len(warning) == 1 and "3 of 3 results" in warning[0]
    assert any(" ~" in x for x in lines)
    assert summary.noise_warning(_classic_run(spread=0.02)) is None


def test_floor_below_one_is_flagged_but_not_for_the_base():
    run = _classic_run()
    for bench in run:                      # a floor of 28 ms: the base (25 ms) may sit below
        bench["extra_info"].update(flop_floor_ms=28.0, byte_floor_ms=1.0)
    assert summary.floor_warnings(run) == []
    run[2]["extra_info"]["median_ms"] = 27.0          # svk under the adapter's floor
    warnings = summary.floor_warnings(run)
    assert len(warnings) == 1 and "svk: 0.96× floor" in warnings[0]
    assert any(x.startswith("WARNING impossible × floor") for x in summary.summarize(run))


def test_decode_group_reads_against_the_base():
    g = "decode batch 4"
    run = [result(g, "base", 10.0, family="decode", short="decode b4", label="base"),
           result(g, "svk-lora_xs", 11.0, family="decode", label="svk lora_xs r16"),
           result(g, "peft-lora", 12.0, family="decode", label="PEFT LoRA r16")]
    lines = summary.group_lines(g, summary.groups(run)[g])
    assert any("svk lora_xs r16" in x and "1.10× base" in x for x in lines)


# Targets ----------------------------------------------------------------------------------

def test_host_targets_compare_svk_with_the_reference():
    g = "host sv_linear lora_xs fwd M1 in64 out64 r8"
    extra = dict(family="host", level="op", short="host sv_linear lora_xs fwd")
    run = [result(g, "svk", 96.0e-3, **extra), result(g, "reference", 35.0e-3, **extra),
           result(g, "base", 3.7e-3, **extra)]
    (t,) = summary.targets(run)
    assert t["name"] == "host sv_linear lora_xs fwd: svk / reference"
    assert t["ratio"] == pytest.approx(96 / 35) and not t["ok"] and t["at_most"]
    module = [dict(r, extra_info=dict(r["extra_info"], level="module")) for r in run]
    assert summary.targets(module) == []            # module level: shown, no target


def test_decode_targets():
    g = "decode batch 4"

    def dec(provider, ms, **kw):
        return result(g, provider, ms, family="decode", short="decode b4", label=provider, **kw)
    run = [dec("base", 10.0), dec("svk-lora_xs", 11.0), dec("peft-lora", 15.0),
           dec("bank-r1", 12.0, users=4, resident=1),
           dec("bank-r10000", 14.0, users=4, resident=10_000)]
    found = {t["name"]: t for t in summary.targets(run)}
    assert found["decode b4: svk-lora_xs / base"]["ok"]                 # 1.1 ≤ 1.2
    assert found["decode b4: svk-lora_xs / PEFT LoRA"]["ok"]            # faster than PEFT
    assert found["decode b4: bank-r1 / base"]["ok"]                     # 1.2 ≤ 1.3
    assert not found["decode b4: bank-r10000 / base"]["ok"]             # 1.4
    resident = found["decode b4: bank 4 users, 10000 / 1 resident, |ratio − 1|"]
    assert resident["ratio"] == pytest.approx(14 / 12 - 1) and not resident["ok"]


def test_model_step_target_is_a_speed_up():
    g = "model step lora llama h512"
    run = [result(g, "svk", 320.0), result(g, "reference", 291.0), result(g, "peft", 291.0)]
    (t,) = summary.targets(run)
    assert not t["at_most"] and t["ratio"] == pytest.approx(291 / 320) and not t["ok"]
    assert "MISSED" in summary.target_line(t) and "≥ 1" in summary.target_line(t)


def test_within_noise_marks_a_limit_inside_the_ratio_range():
    g = "host x fwd"
    extra = dict(family="host", level="op")
    run = [result(g, "svk", 1.02, spread=0.2, **extra),
           result(g, "reference", 1.0, spread=0.2, **extra)]
    (t,) = summary.targets(run)
    assert not t["ok"] and t["within_noise"]
    assert "MISSED (within noise)" in summary.target_line(t)


def test_before_after_table(tmp_path):
    g = "host sv_linear sara fwd M1"
    extra = dict(family="host", level="op", short="host sv_linear sara fwd")
    before = [result(g, "svk", 0.2, **extra), result(g, "reference", 0.1, **extra)]
    after = [result(g, "svk", 0.08, **extra), result(g, "reference", 0.1, **extra)]
    lines = summary.before_after(before, after)
    assert lines[2] == "| host sv_linear sara fwd: svk / reference | ≤ 1 | 2.00 missed | " \
                       "0.80 met |"
    paths = []
    for name, run in (("b.json", before), ("a.json", after)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(run))
    assert summary.main([str(p) for p in paths]) == 0


def test_readme_rows_from_the_host_and_decode_families():
    rows = []
    for mode, (svk_us, ref_us) in {"fwd": (20, 40), "fwd+bwd": (150, 100)}.items():
        g = f"host sv_linear lora_xs {mode}"
        extra = dict(family="host", level="op", case="sv_linear lora_xs", mode=mode, M=1,
                     in_features=64, out_features=64, rank=8)
        rows += [result(g, "svk", svk_us / 1e3, **extra), result(g, "reference", ref_us / 1e3,
                                                                    **extra),
                 result(g, "base", 5 / 1e3, **extra)]
    g = "decode batch 4"
    rows += [result(g, "base", 10.0, family="decode", batch=4),
             result(g, "svk-lora_xs", 12.0, family="decode", batch=4),
             result(g, "bank-r10000", 13.0, family="decode", batch=4, distinct=4,
                    resident=10_000)]
    host, decode = summary.readme_rows(rows)
    assert host.startswith("| per call, `sv_linear`, LoRA-XS arguments (core trains), M 1, "
                           "64→64, r 8: fwd / fwd+bwd | | 5.00 / 5.00 µs | 40.0 / 100 µs | "
                           "20.0 / 150 µs (0.50× / 1.50× the reference's time) |")
    assert "lora_xs 1.20× the base" in decode and "1.30× (4 of 10 000 resident)" in decode


def test_markdown_words_the_reference_column():
    table = "\n".join(summary.markdown(_classic_run()))
    assert "0.75× = 1.33× slower" in table and "1.20× faster" in table
    assert "× faster" not in table.replace("1.20× faster", "")


# Timing helpers (no timing asserted) ------------------------------------------------------

def test_quantile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert quantile(values, q) == pytest.approx(np.quantile(values, q))
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_interleaved_rotates_the_order_and_counts_calls():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = interleaved(fns, calls=2, rounds=3, warmup=0)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert order[:6] == list("aabbcc") and order[6:12] == list("bbccaa")


def test_interleaved_takes_a_count_per_provider():
    counts = {"a": 0, "b": 0}

    def bump(name):
        counts[name] += 1
    fns = {name: (lambda name=name: bump(name)) for name in counts}
    interleaved(fns, calls={"a": 3, "b": 1}, rounds=2, warmup=0)
    assert counts == {"a": 6, "b": 2}


def test_calls_for_stays_within_its_bounds():
    from benchmarks.utils import calls_for
    calls = calls_for({"fast": lambda: None}, 1.0, low=10, high=50)
    assert calls == {"fast": 50}
    assert calls_for({"fast": lambda: None}, 0.0, low=7, high=50) == {"fast": 7}


def test_interleaved_enters_the_context_around_each_batch():
    torch = pytest.importorskip("torch")
    seen = []
    interleaved({"f": lambda: seen.append(torch.is_grad_enabled())}, calls=2, rounds=2,
                warmup=1, context=torch.no_grad)
    assert seen == [False] * 5 and torch.is_grad_enabled()


def test_as_result_has_the_json_schema():
    bench = as_result("t[x]", "g", [0.002, 0.001, 0.003, 0.004, 0.005], provider="svk")
    assert median_ms(bench) == pytest.approx(3.0)
    assert bench["extra_info"]["p20_ms"] == pytest.approx(1.8)
    assert bench["stats"]["rounds"] == 5 and bench["group"] == "g"


def test_force_strategy_makes_svk_read_the_variable_again(monkeypatch):
    from benchmarks.utils import force_strategy
    from svk.ops import _dispatch
    monkeypatch.delenv("SVK_STRATEGY", raising=False)
    settings = getattr(_dispatch, "SETTINGS", None)
    try:
        force_strategy("fused")
        assert os.environ["SVK_STRATEGY"] == "fused"
        if hasattr(settings, "strategy"):       # svk that reads its settings once
            assert settings.strategy == "fused"
    finally:
        force_strategy(None)
    assert getattr(settings, "strategy", None) is None


# Where the results go ---------------------------------------------------------------------

def _config(save=False, tables=False):
    options = {"--svk-save-results": save, "--svk-bench-tables": tables}
    return types.SimpleNamespace(getoption=options.__getitem__)


def test_results_stay_untracked_unless_asked(monkeypatch):
    conftest = pytest.importorskip("benchmarks.conftest")
    monkeypatch.delenv("SVK_BENCH_SAVE", raising=False)
    monkeypatch.delenv("SVK_BENCH_RESULTS", raising=False)
    results = ROOT / "benchmarks" / "results"
    assert conftest.results_path(_config(), "cpu") == results / "local" / "latest-cpu.json"
    assert conftest.results_path(_config(save=True), "cpu") == results / "latest-cpu.json"
    monkeypatch.setenv("SVK_BENCH_SAVE", "1")
    assert conftest.results_path(_config(), "cuda") == results / "latest-cuda.json"
    monkeypatch.setenv("SVK_BENCH_RESULTS", "/tmp/out/h100.json")      # gpu.sh names a file
    assert conftest.results_path(_config(), "cuda") == pathlib.Path("/tmp/out/h100.json")
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "benchmarks/results/local/" in ignored


def test_pytest_benchmark_tables_are_not_printed_by_default():
    conftest = pytest.importorskip("benchmarks.conftest")
    written = []
    reporter = types.SimpleNamespace(write_line=written.append)
    for tables, expected in ((False, None), (True, ["group"])):
        config = _config(tables=tables)
        config._svk_summary = ["svk benchmark summary"]
        config._benchmarksession = types.SimpleNamespace(groups=["group"])
        conftest.pytest_terminal_summary(reporter, config)
        assert config._benchmarksession.groups == expected
    assert written.count("svk benchmark summary") == 2


def test_pytest_benchmark_results_get_p20_p80_from_their_rounds():
    conftest = pytest.importorskip("benchmarks.conftest")
    bench = {"stats": {"data": [0.001, 0.002, 0.003, 0.004, 0.005]}, "extra_info": {}}
    out = conftest._with_spread(bench)
    assert "data" not in out["stats"]
    assert out["extra_info"]["p20_ms"] == pytest.approx(1.8)
    assert out["extra_info"]["p80_ms"] == pytest.approx(4.2)
