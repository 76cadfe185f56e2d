"""The bench's picture: every lost probe of every run, per contender, on one time axis.

matplotlib is an optional extra (`pip install -e '.[bench]'`), imported here only and lazily
(through importlib, so that neither the bench nor the type check needs it).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bridge_migrate_testlab.benchlab import STREAMS
from bridge_migrate_testlab.benchstats import RunRecord, present
from bridge_migrate_testlab.contenders import lookup

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def draw(records: Sequence[RunRecord], path: Path, title: str) -> str:
    """Write the PNG; return a note saying what was done (or why not)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")  # no display: a file only
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "no timeline picture: matplotlib is not installed (pip install -e '.[bench]')"
    keys = present(records)
    if not keys:
        return "no timeline picture: no runs"
    runs = [max(1, sum(1 for r in records if r.contender == k)) for k in keys]
    heights = [1.2 + min(n, 100) / 25 for n in runs]  # a panel grows with its runs, capped
    fig, axes = plt.subplots(
        len(keys),
        1,
        figsize=(11, sum(heights) + 1.4),
        sharex=True,
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    axes = [row[0] for row in axes]
    for ax, key in zip(axes, keys, strict=True):
        _panel(ax, key, [r for r in records if r.contender == key])
    axes[-1].set_xlabel("ms since the bench started the contender's process (probes every 1 ms)")
    handles = [
        axes[0].scatter([], [], s=14, color=c, label=n)
        for n, c in zip(STREAMS, _COLOURS, strict=True)
    ]
    fig.legend(handles=handles, loc="lower center", ncols=len(STREAMS), fontsize=8)
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"timeline picture written to {path}"


def _panel(ax: Any, key: str, runs: Sequence[RunRecord]) -> None:
    label = lookup(key).label
    for row, r in enumerate(runs):
        # The contender's process as a grey bar; each lost probe a dot, one lane per stream.
        ax.plot([0, r.attempt.wall_ms], [row, row], color="0.85", lw=0.8, zorder=0)
        for lane, (s, colour) in enumerate(zip(r.streams, _COLOURS, strict=True)):
            if s.lost_at_ms:
                y = [row + (lane - 2) * 0.15] * len(s.lost_at_ms)
                ax.scatter(s.lost_at_ms, y, s=4, color=colour, lw=0)
    lossy = sum(1 for r in runs if r.lost)
    ax.set_title(f"{label}: {len(runs)} runs, {lossy} with a lost probe", fontsize=9, loc="left")
    ax.set_ylabel("run")
    ax.set_ylim(-1, max(len(runs), 1))
