"""Collects every benchmark of the run into one JSON and one markdown file and prints a short
summary (benchmarks/summary.py): each case's svk vs reference vs base with spreads, a verdict,
issue 12's targets, and warnings for a noisy run or impossible floors.

Where the files go: benchmarks/results/local/latest-<device>.{json,md} (untracked) by default;
the tracked benchmarks/results/latest-<device>.* only with --svk-save-results or
SVK_BENCH_SAVE=1 (they are the README's published numbers); SVK_BENCH_RESULTS=PATH names the
JSON explicitly (benchmarks/gpu.sh). pytest-benchmark's own wide tables are not printed (the
JSON holds the same numbers); --svk-bench-tables prints them too.

Results come from pytest-benchmark (the `benchmark` fixture) and from the interleaved timer of
the host-overhead and decode families (the `svk_results` fixture: a list to append
benchmarks.utils.as_result dicts to).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.summary import markdown, summarize  # noqa: E402
from benchmarks.utils import force_strategy, quantile  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def pytest_addoption(parser):
    group = parser.getgroup("svk benchmarks")
    group.addoption("--svk-save-results", action="store_true", default=False,
                    help="write benchmarks/results/latest-<device>.{json,md} (tracked: the "
                         "README's numbers) instead of benchmarks/results/local/")
    group.addoption("--svk-bench-tables", action="store_true", default=False,
                    help="also print pytest-benchmark's own tables")


@pytest.fixture(scope="session")
def svk_results(request):
    """Results timed outside pytest-benchmark; the session's summary includes them."""
    if not hasattr(request.config, "_svk_results"):
        request.config._svk_results = []
    return request.config._svk_results


@pytest.fixture
def svk_strategy():
    """force_strategy(name) for one test; the previous SVK_STRATEGY is restored (and read
    again) afterwards. Setting the variable alone no longer works: svk reads it once."""
    previous = os.environ.get("SVK_STRATEGY")
    yield force_strategy
    force_strategy(previous)


def results_path(config, device) -> pathlib.Path:
    save = config.getoption("--svk-save-results") or os.environ.get("SVK_BENCH_SAVE") == "1"
    folder = RESULTS if save else RESULTS / "local"
    return folder / os.environ.get("SVK_BENCH_RESULTS", f"latest-{device}.json")


def _with_spread(bench):
    """A pytest-benchmark result with p20/p80 from its rounds (the summary's spread)."""
    data = bench["stats"].pop("data", None)
    if data and "p20_ms" not in bench["extra_info"]:
        bench["extra_info"]["p20_ms"] = quantile(data, 0.2) * 1e3
        bench["extra_info"]["p80_ms"] = quantile(data, 0.8) * 1e3
    return bench


def _header():
    import svk
    where = pathlib.Path(svk.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "svk"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", ""
    return (f": svk at {where} ({rev or 'no git'}{', svk/ modified' if dirty else ''}), "
            f"torch {torch.__version__}")


def pytest_sessionfinish(session):
    config = session.config
    bench_session = getattr(config, "_benchmarksession", None)
    benchmarks = []
    if bench_session is not None:
        benchmarks = [_with_spread(b.as_dict(include_data=True))
                      for b in bench_session.benchmarks if b.has_error is False]
    benchmarks += getattr(config, "_svk_results", [])
    if not benchmarks:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = results_path(config, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(benchmarks, indent=1, default=str))
    out.with_suffix(".md").write_text("\n".join(markdown(benchmarks)) + "\n")
    config._svk_summary = summarize(benchmarks, header=_header()) + [
        "", f"full tables: {out.with_suffix('.md')} and {out}"]


@pytest.hookimpl(tryfirst=True)
def pytest_terminal_summary(terminalreporter, config):
    lines = getattr(config, "_svk_summary", None)
    if lines:
        terminalreporter.write_line("")
        for line in lines:
            terminalreporter.write_line(line)
    bench_session = getattr(config, "_benchmarksession", None)
    if bench_session is not None and not config.getoption("--svk-bench-tables"):
        bench_session.groups = None   # pytest-benchmark's display() prints nothing then
