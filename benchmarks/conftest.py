"""Collects every benchmark of the run into benchmarks/results/latest-<device>.json and prints
a markdown table per group, with each provider's time relative to the reference and the floor
(the base layer alone) measured in the same run."""
import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.utils import floor_ms, median_ms  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def _floor_line(extra):
    """The case's two floors (benchmarks/floors.py), when it counted its work."""
    if "flops" not in extra:
        return ""
    return (f"floors: {extra['flops'] / 1e9:.3g} GFLOP at {extra['matrix_tflops']:.3g} TFLOP/s "
            f"= {extra['flop_floor_ms']:.3g} ms; {extra['bytes'] / 1e6:.3g} MB at "
            f"{extra['copy_gbps']:.3g} GB/s = {extra['byte_floor_ms']:.3g} ms\n")


def _rows(benchmarks):
    groups = {}
    for bench in benchmarks:
        groups.setdefault(bench.get("group") or bench["name"], []).append(bench)
    lines = []
    for group, items in groups.items():
        by_provider = {b["extra_info"].get("provider"): median_ms(b) for b in items}
        lines += [f"\n**{group}**\n", _floor_line(items[0]["extra_info"]),
                  "| benchmark | provider | median ms | × reference | × base | × floor | "
                  "saved for backward |", "|---|---|---|---|---|---|---|"]
        for bench in items:
            extra = bench["extra_info"]
            ms = median_ms(bench)
            ref, base = by_provider.get("reference"), by_provider.get("base")
            floor = floor_ms(extra)
            saved = extra.get("saved_bytes")
            lines.append(
                f"| {bench['name'].split('[')[-1].rstrip(']')} | {extra.get('provider', '')} | "
                f"{ms:.3f} | {f'{ref / ms:.2f}× faster' if ref else ''} | "
                f"{f'{ms / base:.2f}' if base else ''} | {f'{ms / floor:.2f}' if floor else ''} | "
                f"{'' if saved is None else f'{saved / 2**20:.2f} MiB'} |")
    return lines


def pytest_sessionfinish(session):
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is None or not bench_session.benchmarks:
        return
    benchmarks = [b.as_dict(include_data=False) for b in bench_session.benchmarks if b.has_error
                  is False]
    if not benchmarks:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / os.environ.get("SVK_BENCH_RESULTS", f"latest-{device}.json")
    out.write_text(json.dumps(benchmarks, indent=1, default=str))
    table = "\n".join(_rows(benchmarks))
    (out.with_suffix(".md")).write_text(table + "\n")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(table)
        reporter.write_line(f"\nresults: {out} and {out.with_suffix('.md')}")
