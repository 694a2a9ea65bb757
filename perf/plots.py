"""PNG plots of perf/bench_network.py's results, so scaling over profiles and chain lengths reads at a glance.

    .venv/bin/python perf/plots.py [perf/results/network.json] [--out perf/plots]

network_decode.png: a row per prompt context, a panel per network profile, bars
for chains of 1, 2 and 3 workers, relayed by the client and pushed server to
server, each with its floor (local step + link delay) drawn over it.
network_forward.png: a row per forward batch, bars per chain length with
pipelined micro-batches on and off, the one-process figure as a dashed line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no display backend, no global figure state
from matplotlib.lines import Line2D

ROOT = Path(__file__).resolve().parent.parent
# (bar, figure on it): dark figures on light bars, white on dark
DECODE_COLORS = {"relay": ("#8da0cb", "black"), "push": ("#1b4f9c", "white")}
FORWARD_COLORS = {"auto": ("#2a9d5c", "white"), "1": ("#a6d9b8", "black")}
FORWARD_LABELS = {"auto": "micro_batches=auto (pipelined)", "1": "micro_batches=1"}
WIDTH = 0.8  # of each chain's slot, shared by its bars


def link_title(name: str, link: dict | None) -> str:
    if link is None:
        return f"{name}\n(unshaped)"
    return f"{name}\nrtt {link['rtt_p50_ms']:.1f} ms, {link['throughput_mbit']:.0f} Mbit/s"


def chain_labels(chains: dict) -> list[str]:
    return [f"{n} worker{'s' if int(n) > 1 else ''}" for n in chains]


def grouped_bars(ax, chains: dict, series: dict[str, list[float]], colors: dict, labels: dict) -> list[np.ndarray]:
    """One bar per series in each chain's slot, its value written inside; returns the bars' x, series by series."""
    x = np.arange(len(chains))
    width = WIDTH / len(series)
    xs = []
    for k, (key, values) in enumerate(series.items()):
        pos = x + (k - (len(series) - 1) / 2) * width
        fill, ink = colors[key]
        bars = ax.bar(pos, values, width, color=fill, label=labels[key])
        # inside: just above the bar may sit its floor line
        ax.bar_label(bars, fmt="%.1f" if max(values) < 50 else "%.0f", label_type="center", fontsize=7,
                     color=ink, fontweight="bold")
        xs.append(pos)
    ax.set_xticks(x, chain_labels(chains), fontsize=8)
    ax.margins(y=0.12)
    return xs


def label_panel(ax, row: int, col: int, profile: str, link: dict | None, ylabel: str) -> None:
    """Profiles title the top row, the metric labels the first column."""
    if row == 0:
        ax.set_title(link_title(profile, link), fontsize=9)
    if col == 0:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(axis="y", alpha=0.3)


def finish(fig: Figure, axes, dashed: str, title: str, results: dict) -> Figure:
    """One legend for every panel (the bars' series and what the dashed lines mark) and the run's title."""
    handles = [*axes[0][0].get_legend_handles_labels()[0],
               Line2D([], [], color="black", linestyle="--", label=dashed)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    fig.suptitle(f"{title}, {results['model']} (higher is better)\n{results['machine']}, {results['date']}",
                 fontsize=10)
    return fig


def first_chain(profiles: dict) -> dict:
    """The first profile's first chain: every chain was measured at the same contexts and batches."""
    return next(iter(next(iter(profiles.values()))["chains"].values()))


def panel_grid(rows: int, cols: int):
    """A figure of rows x cols panels, each on its own scale: a 100 ms link's bars stay as readable as
    loopback's."""
    fig = Figure(figsize=(3.6 * cols + 0.6, 3.2 * rows + 0.9), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def decode_figure(results: dict) -> Figure:
    profiles = results["profiles"]
    contexts = list(first_chain(profiles)["decode"]["relay"])
    fig, axes = panel_grid(len(contexts), len(profiles))
    for row, ctx in enumerate(contexts):
        for col, (name, prof) in enumerate(profiles.items()):
            ax, chains = axes[row][col], prof["chains"]
            series = {mode: [c["decode"][mode][ctx] for c in chains.values()] for mode in DECODE_COLORS}
            xs = grouped_bars(ax, chains, series, DECODE_COLORS, {m: m for m in DECODE_COLORS})
            half = 0.45 * WIDTH / len(series)  # a little short of the bar: side by side floors stay two dashes
            for pos, mode in zip(xs, series):
                floor = [c["floor"][mode][ctx] for c in chains.values()]
                ax.hlines(floor, pos - half, pos + half, colors="black", linestyles="--", linewidth=1.2)
            label_panel(ax, row, col, name, prof["link"], f"decode steps/s\n{ctx}-token context")
    return finish(fig, axes, "floor: local step + link delay", "Single-batch decode", results)


def forward_figure(results: dict) -> Figure:
    profiles, local = results["profiles"], results["local"]["forward_tok_s"]
    forward = first_chain(profiles)["forward"]
    variants, batches = list(forward), list(forward["auto"])
    fig, axes = panel_grid(len(batches), len(profiles))
    for row, batch in enumerate(batches):
        for col, (name, prof) in enumerate(profiles.items()):
            ax, chains = axes[row][col], prof["chains"]
            series = {v: [c["forward"][v][batch] for c in chains.values()] for v in variants}
            grouped_bars(ax, chains, series, FORWARD_COLORS, FORWARD_LABELS)
            ax.axhline(local[batch], color="black", linestyle="--", linewidth=1.2)
            label_panel(ax, row, col, name, prof["link"], f"forward tokens/s\nbatch {batch} x 128 tokens")
    return finish(fig, axes, "one process, no network", "Parallel forward", results)


def write_plots(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, make in (("network_decode", decode_figure), ("network_forward", forward_figure)):
        path = out / f"{stem}.png"
        make(results).savefig(path, dpi=110)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(ROOT / "perf" / "results" / "network.json"),
                        help="JSON written by perf/bench_network.py --json")
    parser.add_argument("--out", default=str(ROOT / "perf" / "plots"), help="folder for the PNGs")
    args = parser.parse_args(argv)
    paths = write_plots(json.loads(Path(args.results).read_text()), Path(args.out))
    for path in paths:
        print(f"wrote {path}")
    return paths


if __name__ == "__main__":
    main()
