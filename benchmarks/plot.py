"""Plots of a benchmark run: python benchmarks/plot.py benchmarks/results/latest-cpu.json

Writes PNGs next to the JSON (<stem>-<family>.png), one per family of benchmarks:
  sv_linear, sv_mixture_linear   time per provider as a multiple of the base layer's, per case,
                                 with the case's floor (benchmarks/floors.py) as a black tick
  bank-layer, bank-model         decode time against the number of resident adapters
  linalg                         rsvd and its alternatives, time per provider
  model                          a whole-model training step per provider, over the naive
                                 reference (each method's group has one; only lora_xs has base)
Needs matplotlib (pip install -e ".[bench]"); the benchmarks themselves do not.
"""
import json
import pathlib
import re
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from benchmarks.utils import floor_ms, median_ms  # noqa: E402


def _groups(benchmarks, prefix):
    groups = {}
    for bench in benchmarks:
        group = bench.get("group") or ""
        if group.startswith(prefix):
            groups.setdefault(group, []).append(bench)
    return groups


def _bars(plt, groups, title, path, relative_to="base"):
    """One cluster of bars per group: each provider's time over `relative_to`'s."""
    providers = []
    for items in groups.values():
        for bench in items:
            if bench["extra_info"]["provider"] not in providers:
                providers.append(bench["extra_info"]["provider"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / len(providers)
    for j, provider in enumerate(providers):
        for i, items in enumerate(groups.values()):
            by = {b["extra_info"]["provider"]: b for b in items}
            ref = by.get(relative_to)
            if provider not in by or ref is None:
                continue
            ratio = median_ms(by[provider]) / median_ms(ref)
            ax.bar(i + j * width, ratio, width, color=f"C{j}",
                   label=provider if i == 0 or provider not in ax.get_legend_handles_labels()[1]
                   else None)
            extra = ref["extra_info"]
            floor = floor_ms(extra)
            if floor and j == 0:
                ax.hlines(floor / median_ms(ref), i - width / 2, i + 0.8 - width / 2,
                          colors="black", linewidth=2, label="floor" if i == 0 else None)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([_short(g) for g in groups], fontsize=7)
    ax.set_ylabel(f"time / {relative_to} (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _lines(plt, groups, title, path):
    """Decode time against resident adapters, one line per provider, one panel per shape."""
    shapes = {}
    for group, items in groups.items():
        shape, resident = re.match(r"(.*) resident(\d+)$", group).groups()
        for bench in items:
            shapes.setdefault(shape, {}).setdefault(bench["extra_info"]["provider"], []).append(
                (int(resident), median_ms(bench)))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, (shape, providers) in zip(axes[0], shapes.items()):
        for j, (provider, points) in enumerate(providers.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=f"C{j}",
                    label=provider)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("resident adapters")
        ax.set_ylabel("median ms (log)")
        ax.set_title(_short(shape), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(group):
    """A tick label: the group name less its family, three words a line."""
    words = re.sub(r"^(sv_linear|sv_mixture_linear|bank layer decode|bank model decode|"
                   r"model step|linalg:) ", "", group).split()
    return "\n".join(" ".join(words[i:i + 3]) for i in range(0, len(words), 3))


def plot(results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = pathlib.Path(results)
    benchmarks = json.loads(results.read_text())
    device = benchmarks[0]["extra_info"].get("gpu") or benchmarks[0]["extra_info"].get("cpu")
    stem = results.with_suffix("")
    written = []
    for prefix, family in [("sv_linear", "sv_linear"), ("sv_mixture_linear", "sv_mixture_linear")]:
        groups = _groups(benchmarks, prefix + " ")
        if groups:
            written.append(_bars(plt, groups, f"{family}: time / base layer ({device})",
                                 f"{stem}-{family}.png"))
    for prefix, family in [("bank layer decode", "bank-layer"), ("bank model decode",
                                                                  "bank-model")]:
        groups = _groups(benchmarks, prefix)
        if groups:
            written.append(_lines(plt, groups, f"{prefix} ({device})", f"{stem}-{family}.png"))
    for prefix, family, ref in [("linalg", "linalg", "reference"), ("model", "model", "reference")]:
        groups = _groups(benchmarks, prefix)
        if groups:
            written.append(_bars(plt, groups, f"{prefix}: time / {ref} ({device})",
                                 f"{stem}-{family}.png", relative_to=ref))
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n")[0])
    for path in plot(sys.argv[1]):
        print(path)
