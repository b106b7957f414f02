#!/usr/bin/env python3
"""Draws a soak's results (soak.py's JSON) as one PNG of four panels over time: tokens/s, the ok
answers' p50 and p99 latency, answers by outcome per window, and every server process's RSS.

    .venv/bin/python benchmarks/load/soak_plot.py benchmarks/load/soak_results.json benchmarks/load/soak.png
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

COLOURS = {"ok": "tab:green", "cancelled": "tab:blue", "rejected": "tab:orange", "ended": "tab:gray",
           "failed": "tab:red", "lost": "black"}


def draw(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    wins = summary["windows"]
    _throughput(axes[0], wins)
    _latency(axes[1], wins)
    _answers(axes[2], wins)
    _rss(axes[3], summary["samples"])
    for ax in axes:
        ax.axvline(summary["end"]["t"], color="k", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(f"seconds (dotted: the end, {summary['end']['how']})")
    c = summary["config"]
    fig.suptitle(f"soak: {c['concurrency']} clients, {c['duration_s']:g} s, {summary['sent']} sent, {summary['ok']} ok, "
                 f"{summary['failed']} failed, {summary['lost']} lost, {summary['preemptions'] or 0:.0f} preemptions")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _throughput(ax, wins) -> None:
    points = [(w["t"], w["tok_s"]) for w in wins if "tok_s" in w]
    ax.plot(*zip(*points) if points else ([], []), color="tab:green")
    ax.set_ylabel("generated tok/s")


def _latency(ax, wins) -> None:
    for key, style in (("p50_ms", "-"), ("p99_ms", "--")):
        points = [(w["t"], w[key] / 1e3) for w in wins if key in w]
        ax.plot(*zip(*points) if points else ([], []), style, color="tab:purple", label=key.split("_")[0])
    ax.set_ylabel("ok latency, s")
    ax.legend(loc="upper left")


def _answers(ax, wins) -> None:
    bottom = [0] * len(wins)
    times = [w["t"] for w in wins]
    for outcome, colour in COLOURS.items():
        heights = [w["answers"].get(outcome, 0) for w in wins]
        if any(heights):
            ax.bar(times, heights, width=(times[1] - times[0]) * 0.9 if len(times) > 1 else 1, bottom=bottom,
                   color=colour, label=outcome, align="edge")
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("answers per window")
    ax.legend(loc="upper left", ncol=len(COLOURS))


def _rss(ax, samples) -> None:
    series = collections.defaultdict(list)
    for s in samples:
        for name, mb in s["rss_mb"].items():
            series[name].append((s["t"], mb))
    for name, points in sorted(series.items(), key=lambda kv: -max(mb for _, mb in kv[1])):
        ax.plot(*zip(*points), label=name)
    ax.set_ylabel("RSS, MB")
    ax.legend(loc="upper left", fontsize="x-small", ncol=3)


if __name__ == "__main__":
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
