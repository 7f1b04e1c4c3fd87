"""The benchmark run's printed summary, its markdown tables, its targets and a before/after table.

Pure functions of the results list (pytest-benchmark's `as_dict` shape, which
benchmarks.utils.as_result also produces): nothing here times anything, so
tests/test_bench_tools.py checks the wording without a benchmark run.

    python benchmarks/summary.py RESULTS.json                 the summary of a saved run
    python benchmarks/summary.py BEFORE.json AFTER.json       the targets, before and after
    python benchmarks/summary.py --readme RESULTS.json        README results-table rows

Wording: a speed ratio r = t_reference / t_svk reads "1.30× faster" when r ≥ 1 and
"0.77× = 1.30× slower" when r < 1; a cost ratio over the base reads "1.71× base". Spread: the
p20–p80 range of the rounds (extra_info p20_ms/p80_ms; pytest-benchmark results get them from
their rounds in conftest.py). A verdict says "faster"/"slower" only when the two spreads do not
overlap, else "even".
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.utils import floor_ms, median_ms  # noqa: E402

NOISE = float(os.environ.get("SVK_BENCH_NOISE", "0.10"))   # relative p20–p80 spread: "noisy"
SUBJECT, REFERENCE, BASE = "svk", "reference", "base"


# Words ------------------------------------------------------------------------------------

def speed_words(ratio: float) -> str:
    """A speed ratio (t_other / t_svk: above 1 means svk is faster) in words."""
    if not ratio > 0 or math.isinf(ratio):
        raise ValueError(f"a speed ratio must be positive and finite, got {ratio!r}")
    if round(ratio, 2) == 1.0:
        return "1.00× (same speed)"
    if ratio > 1:
        return f"{ratio:.2f}× faster"
    return f"{ratio:.2f}× = {1 / ratio:.2f}× slower"


def cost_words(ratio: float, of: str = "base") -> str:
    """A time ratio (t_svk / t_other) as a multiple: "1.71× base", "57.1× base"."""
    return f"{fmt_number(ratio)}× {of}"


def fmt_number(value: float) -> str:
    """Three significant figures, never in exponent notation (2180, 28.9, 0.0961)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def fmt_time(ms: float, unit: str | None = None) -> str:
    """ms in the unit that suits it (µs below 1 ms, s from 1000 ms), three significant
    figures."""
    unit = unit or ("µs" if ms < 1 else "ms" if ms < 1000 else "s")
    value = ms * {"µs": 1e3, "ms": 1.0, "s": 1e-3}[unit]
    return f"{fmt_number(value)} {unit}"


def versus(ratio: float, other: str) -> str:
    """speed_words against a named other: "1.30× faster than ref", "as fast as ref (1.00×)"."""
    words = speed_words(ratio)
    if words.endswith("(same speed)"):
        return f"as fast as {other} (1.00×)"
    return f"{words} than {other}"


# Statistics of one result -----------------------------------------------------------------

def spread_ms(bench) -> tuple[float, float]:
    """(p20, p80) in ms; pytest-benchmark's quartiles when the result has no p20/p80."""
    extra, stats = bench["extra_info"], bench["stats"]
    if "p20_ms" in extra and "p80_ms" in extra:
        return extra["p20_ms"], extra["p80_ms"]
    return stats["q1"] * 1e3, stats["q3"] * 1e3


def relative_spread(bench) -> float:
    low, high = spread_ms(bench)
    return (high - low) / median_ms(bench)


def is_noisy(bench, threshold: float = NOISE) -> bool:
    return relative_spread(bench) > threshold


def ratio_bounds(num, den) -> tuple[float, float]:
    """The range of t_num / t_den over their p20–p80 spreads."""
    (nl, nh), (dl, dh) = spread_ms(num), spread_ms(den)
    return nl / dh, nh / dl


def verdict(subject, other) -> str:
    """"faster"/"slower" when subject's and other's spreads do not overlap, else "even"."""
    (sl, sh), (ol, oh) = spread_ms(subject), spread_ms(other)
    if sh < ol:
        return "faster"
    if sl > oh:
        return "slower"
    return "even"


def short(name, bench) -> str:
    """A group's short name for target lines (extra_info "short"), else the group's name."""
    return bench["extra_info"].get("short") or name


def label(bench) -> str:
    return bench["extra_info"].get("label") or bench["extra_info"].get("provider") or bench["name"]


# Grouping ---------------------------------------------------------------------------------

def groups(benchmarks) -> dict:
    """group name -> {provider: result}, in the order the run produced them."""
    out = {}
    for bench in benchmarks:
        key = bench.get("group") or bench["name"]
        out.setdefault(key, {})[bench["extra_info"].get("provider") or bench["name"]] = bench
    return out


def _cell(name, bench, unit):
    """"name median [p20–p80]" in the group's unit (named once, on the group's line)."""
    value, low, high = (fmt_time(ms, unit).split()[0]
                        for ms in (median_ms(bench), *spread_ms(bench)))
    return f"{name} {value} [{low}–{high}]{' ~' if is_noisy(bench) else ''}"


def group_lines(name, by_provider) -> list[str]:
    """The summary lines of one group: svk vs reference vs base on one line when the group has
    svk and reference; else each provider against the base (the decode family)."""
    fastest = min(median_ms(b) for b in by_provider.values())
    unit = "µs" if fastest < 1 else "ms" if fastest < 1000 else "s"
    svk, ref, base = (by_provider.get(k) for k in (SUBJECT, REFERENCE, BASE))
    lines = [f"{name} ({unit})"]
    if svk is not None and ref is not None:
        cells = [_cell("svk", svk, unit), _cell("ref", ref, unit)]
        if base is not None:
            cells.append(_cell("base", base, unit))
        words = versus(median_ms(ref) / median_ms(svk), "ref")
        if base is not None:
            words += f", {cost_words(median_ms(svk) / median_ms(base))}"
        lines.append("  " + "  ".join(cells) + f"  → {words}  {verdict(svk, ref).upper()}")
        return lines
    if base is None:
        for provider, bench in by_provider.items():
            lines.append("  " + _cell(label(bench), bench, unit))
        return lines
    width = max(len(label(b)) for b in by_provider.values())
    for provider, bench in by_provider.items():
        cell = _cell(label(bench).ljust(width), bench, unit)
        if bench is base:
            lines.append(f"  {cell}")
            continue
        ratio = median_ms(bench) / median_ms(base)
        lines.append(f"  {cell}  {cost_words(ratio)}  {verdict(bench, base).upper()}")
    return lines


# Warnings ---------------------------------------------------------------------------------

def floor_warnings(benchmarks) -> list[str]:
    """Providers that do the adapter's work in less than its floor: impossible, so the floors
    (measured in the same run) were measured while the machine was busy. The base layer does
    less work than the floor counts and may sit below it."""
    out = []
    for bench in benchmarks:
        floor = floor_ms(bench["extra_info"])
        provider = bench["extra_info"].get("provider")
        if floor and provider != BASE and median_ms(bench) < floor:
            out.append(f"{bench.get('group')} {provider}: {median_ms(bench) / floor:.2f}× floor")
    return out


def noise_warning(benchmarks, threshold: float = NOISE) -> str | None:
    noisy = [b for b in benchmarks if is_noisy(b, threshold)]
    if not noisy:
        return None
    return (f"WARNING noisy run: {len(noisy)} of {len(benchmarks)} results have a p20–p80 "
            f"spread above {threshold:.0%} of their median (marked ~):\nthe machine was busy, "
            f"and ratios inside the spread mean nothing. Rerun on a quiet machine.")


# Targets (issue 12: CPU, one thread, same-run ratios) -------------------------------------

def _target(name, ratio, limit, bounds, *, at_most=True):
    ok = ratio <= limit if at_most else ratio >= limit
    inside = bounds is not None and bounds[0] <= limit <= bounds[1]
    return {"name": name, "ratio": ratio, "limit": limit, "at_most": at_most, "ok": ok,
            "within_noise": inside}


def targets(benchmarks) -> list[dict]:
    """Each target of issue 12 the results can evaluate, as {name, ratio, limit, at_most, ok,
    within_noise}: ok compares the medians; within_noise when the limit lies inside the
    ratio's range over the two spreads (the verdict could flip on a rerun)."""
    out = []
    for name, by in groups(benchmarks).items():
        first = next(iter(by.values()))["extra_info"]
        family = first.get("family")
        svk, ref, base = (by.get(k) for k in (SUBJECT, REFERENCE, BASE))
        name = short(name, next(iter(by.values())))
        if family == "host" and first.get("level") == "op" and svk and ref:
            out.append(_target(f"{name}: svk / reference", median_ms(svk) / median_ms(ref), 1.0,
                               ratio_bounds(svk, ref)))
        elif name.startswith("model step") and svk and ref:
            out.append(_target(f"{name}: reference / svk (speed-up)",
                               median_ms(ref) / median_ms(svk), 1.0, ratio_bounds(ref, svk),
                               at_most=False))
        elif family == "decode" and base:
            out += _decode_targets(name, by, base)
    return out


def _decode_targets(name, by, base):
    """Named by provider, not label: a label carries a rank that may change between runs."""
    out = []
    peft = by.get("peft-lora")
    for provider, bench in by.items():
        extra = bench["extra_info"]
        if provider.startswith("svk-"):
            out.append(_target(f"{name}: {provider} / base", median_ms(bench) /
                               median_ms(base), 1.2, ratio_bounds(bench, base)))
            if peft is not None:
                out.append(_target(f"{name}: {provider} / PEFT LoRA", median_ms(bench) /
                                   median_ms(peft), 1.0, ratio_bounds(bench, peft)))
        elif provider.startswith("bank-") and extra.get("users") == 4:
            out.append(_target(f"{name}: {provider} / base", median_ms(bench) /
                               median_ms(base), 1.3, ratio_bounds(bench, base)))
    banks = sorted((b for p, b in by.items() if p.startswith("bank-")
                    and b["extra_info"].get("users") == 4),
                   key=lambda b: b["extra_info"]["resident"])
    if len(banks) >= 2:
        small, large = banks[0], banks[-1]
        ratio = median_ms(large) / median_ms(small)
        low, high = ratio_bounds(large, small)
        out.append({"name": f"{name}: bank 4 users, {large['extra_info']['resident']} / "
                            f"{small['extra_info']['resident']} resident, |ratio − 1|",
                    "ratio": abs(ratio - 1), "limit": 0.05, "at_most": True,
                    "ok": abs(ratio - 1) <= 0.05,
                    "within_noise": low - 1 <= 0.05 <= high - 1 or low - 1 <= -0.05 <= high - 1})
    return out


def target_line(t) -> str:
    word = "met" if t["ok"] else "MISSED"
    if t["within_noise"]:
        word += " (within noise)"
    op = "≤" if t["at_most"] else "≥"
    return f"  {word:<22} {t['name']}: {t['ratio']:.2f} (target {op} {t['limit']:g})"


# The summary ------------------------------------------------------------------------------

def summarize(benchmarks, *, header: str = "", threshold: float = NOISE) -> list[str]:
    """The short summary printed after a run: one block per group, the targets, warnings."""
    lines = [f"svk benchmark summary{header} (median [p20–p80]; ~ marks a noisy result)"]
    for name, by in groups(benchmarks).items():
        lines += group_lines(name, by)
    found = targets(benchmarks)
    if found:
        met = sum(t["ok"] for t in found)
        lines += ["", f"Targets (issue 12; CPU, one thread, same-run ratios): {met} of "
                      f"{len(found)} met"]
        lines += [target_line(t) for t in found]
    warning = noise_warning(benchmarks, threshold)
    if warning:
        lines += [""] + warning.split("\n")
    below = floor_warnings(benchmarks)
    if below:
        lines += ["", f"WARNING impossible × floor below 1 ({len(below)} results): the floors "
                      "were measured", "while the machine was loaded; this run's floor "
                      "ratios are wrong."] + [f"  {item}" for item in below]
    return lines


def _floor_line(extra):
    """The case's two floors (benchmarks/floors.py), when it counted its work."""
    if "flops" not in extra:
        return ""
    return (f"floors: {extra['flops'] / 1e9:.3g} GFLOP at {extra['matrix_tflops']:.3g} TFLOP/s "
            f"= {extra['flop_floor_ms']:.3g} ms; {extra['bytes'] / 1e6:.3g} MB at "
            f"{extra['copy_gbps']:.3g} GB/s = {extra['byte_floor_ms']:.3g} ms\n")


def markdown(benchmarks) -> list[str]:
    """The long tables (the .md file): every provider of every group, with spread, the ratio to
    the reference and to the base, × floor and bytes saved for backward."""
    lines = []
    for group, by in groups(benchmarks).items():
        items = list(by.values())
        ref, base = by.get(REFERENCE), by.get(BASE)
        lines += [f"\n**{group}**\n", _floor_line(items[0]["extra_info"]),
                  "| benchmark | provider | median ms | p20–p80 ms | vs reference | × base | "
                  "× floor | saved for backward |", "|---|---|---|---|---|---|---|---|"]
        for bench in items:
            extra = bench["extra_info"]
            ms = median_ms(bench)
            low, high = spread_ms(bench)
            floor = floor_ms(extra)
            saved = extra.get("saved_bytes")
            lines.append(
                f"| {bench['name'].split('[')[-1].rstrip(']')} | {label(bench)} | {ms:.4g} | "
                f"{low:.4g}–{high:.4g} | "
                f"{speed_words(median_ms(ref) / ms) if ref and bench is not ref else ''} | "
                f"{f'{ms / median_ms(base):.2f}' if base else ''} | "
                f"{f'{ms / floor:.2f}' if floor else ''} | "
                f"{'' if saved is None else f'{saved / 2**20:.2f} MiB'} |")
    return lines


def before_after(before, after) -> list[str]:
    """The targets of two runs side by side (matched by name)."""
    old = {t["name"]: t for t in targets(before)}
    new = {t["name"]: t for t in targets(after)}
    names = list(old) + [n for n in new if n not in old]
    lines = ["| target | limit | before | after |", "|---|---|---|---|"]
    for name in names:
        t = new.get(name) or old[name]
        op = "≤" if t["at_most"] else "≥"

        def cell(x):
            if x is None:
                return "—"
            return f"{x['ratio']:.2f} {'met' if x['ok'] else 'missed'}" + (
                " (noise)" if x["within_noise"] else "")
        lines.append(f"| {name} | {op} {t['limit']:g} | {cell(old.get(name))} | "
                     f"{cell(new.get(name))} |")
    return lines


HOST_CASES = {"sv_linear lora_xs": "`sv_linear`, LoRA-XS arguments (core trains)",
              "sv_linear sara": "`sv_linear`, SARA arguments (a, s, b train)",
              "sv_mixture_linear": "`sv_mixture_linear`, Mo-SARA k 8, 5 heads",
              "sv_bank_linear": "`sv_bank_linear`, one of 4 adapters per row",
              "LoRAXSLinear": "`LoRAXSLinear` module (base: `nn.Linear`)",
              "bank layer": "bank layer of an `AdapterBank`, one of 4 adapters per row"}


def readme_rows(benchmarks) -> list[str]:
    """Rows for the README's results table (| benchmark | floor | base | reference | svk |)
    from the host-overhead and decode families of a run."""
    by_case = {}
    for name, by in groups(benchmarks).items():
        extra = next(iter(by.values()))["extra_info"]
        if extra.get("family") == "host" and all(k in by for k in (SUBJECT, REFERENCE, BASE)):
            by_case.setdefault(extra["case"], {})[extra["mode"]] = by
    rows = []
    for case, modes in by_case.items():
        order = [m for m in ("fwd", "fwd no_grad", "fwd+bwd") if m in modes]
        unit = "µs" if min(median_ms(modes[m][BASE]) for m in order) < 1 else "ms"

        def times(provider):
            return " / ".join(fmt_time(median_ms(modes[m][provider]), unit).split()[0]
                              for m in order) + f" {unit}"
        ratios = " / ".join(f"{median_ms(modes[m][SUBJECT]) / median_ms(modes[m][REFERENCE]):.2f}×"
                            for m in order)
        shape = modes[order[0]][BASE]["extra_info"]
        rows.append(f"| per call, {HOST_CASES.get(case, case)}, M {shape.get('M')}, "
                    f"{shape.get('in_features')}→{shape.get('out_features')}, "
                    f"r {shape.get('rank')}: "
                    f"{' / '.join(m.replace('fwd no_grad', 'no_grad') for m in order)} | | "
                    f"{times(BASE)} | {times(REFERENCE)} | {times(SUBJECT)} ({ratios} the "
                    f"reference's time) |")
    for name, by in groups(benchmarks).items():
        extra = next(iter(by.values()))["extra_info"]
        if extra.get("family") != "decode" or BASE not in by:
            continue
        base = median_ms(by[BASE])

        def x(provider):
            return f"{median_ms(by[provider]) / base:.2f}×"
        methods = ", ".join(f"{p[4:]} {x(p)}" for p in by if p.startswith("svk-"))
        banks = ", ".join(f"{x(p)} ({by[p]['extra_info']['distinct']} of "
                          f"{by[p]['extra_info']['resident']:,} resident)".replace(",", " ")
                          for p in by if p.startswith("bank-"))
        peft = f"PEFT LoRA r 16: {fmt_time(median_ms(by['peft-lora']))} ({x('peft-lora')})" \
            if "peft-lora" in by else ""
        svk_cell = "; ".join(c for c in (methods and f"{methods} the base",
                                         banks and f"bank (LoRA-XS r 16) {banks}") if c)
        rows.append(f"| tiny LLaMA greedy decode per token, batch {extra['batch']}, 7 "
                    f"projections adapted | | {fmt_time(base)} | {peft} | {svk_cell} |")
    return rows


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = "--readme" in argv
    argv = [a for a in argv if a != "--readme"]
    if len(argv) not in (1, 2) or (readme and len(argv) != 1):
        print(__doc__)
        return 2
    runs = [json.loads(pathlib.Path(p).read_text()) for p in argv]
    if readme:
        lines = readme_rows(runs[0])
    else:
        lines = summarize(runs[0]) if len(runs) == 1 else before_after(*runs)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
