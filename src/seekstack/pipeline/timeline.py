"""Timelines of recorded steps: measured bubble, the README formula next to it, and a PNG like upstream's figure.

>>> ev = [{"rank": 0, "op": "F", "phase": 0, "label": "F0.0", "zb": False, "start": 0.0, "end": 1.0},
...       {"rank": 1, "op": "F", "phase": 0, "label": "F0.0", "zb": False, "start": 1.0, "end": 2.0}]
>>> bubble_stats(ev, "1f1b", 2)["bubble_max"]
1.0
"""

from __future__ import annotations

import statistics
from pathlib import Path

from seekstack.pipeline.simulate import dualpipe_bubble_formula, linear_bubble_formula

COLORS = {"F0": "#8ecae6", "F1": "#219ebc", "B": "#ffb703", "Bz": "#fb8500", "W": "#90be6d", "FB": "#c77dff"}
COMM_COLORS = {"F": "#023047", "B": "#d62828"}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def schedule_events(events: list[dict]) -> list[dict]:
    """The schedule's actions (F, B, W, F&B), without the COMP/COMM sub-intervals an MoE stage may record."""
    return [e for e in events if e["op"] in ("F", "B", "W", "FB")]


def op_times(events: list[dict]) -> dict[str, float]:
    """Median duration of each kind of action: F, B (full backward), Bz (input-grad only), W, FB."""
    kinds: dict[str, list[float]] = {"F": [], "B": [], "Bz": [], "W": [], "FB": []}
    for e in schedule_events(events):
        key = "Bz" if e["op"] == "B" and e["zb"] else e["op"]
        kinds[key].append(e["end"] - e["start"])
    return {k: _median(v) for k, v in kinds.items()}


def bubble_stats(events: list[dict], schedule: str, num_ranks: int) -> dict[str, float]:
    """Measured idle time per rank within the step's span, and the README formula from measured op times.

    The formula's PP is the number of stages: N for DualPipe, 1F1B and ZB1P, 2N for DualPipeV. A full backward B
    that a schedule never runs whole is taken as Bz + W.
    """
    events = schedule_events(events)
    t0 = min(e["start"] for e in events)
    t1 = max(e["end"] for e in events)
    span = t1 - t0
    busy = [0.0] * num_ranks
    for e in events:
        busy[e["rank"]] += e["end"] - e["start"]
    idle = [span - b for b in busy]
    t = op_times(events)
    b_full = t["B"] or (t["Bz"] + t["W"])
    f_and_b = t["FB"] or (t["F"] + b_full)
    if schedule in ("dualpipe", "dualpipev"):
        pp = 2 * num_ranks if schedule == "dualpipev" else num_ranks
        formula = dualpipe_bubble_formula(pp, f_and_b, b_full, t["W"])
    else:
        formula = linear_bubble_formula(schedule, num_ranks, t["F"], b_full, t["W"])
    return {
        "span": span,
        "bubble_max": max(idle),
        "bubble_mean": sum(idle) / num_ranks,
        "bubble_fraction": sum(idle) / (num_ranks * span) if span else 0.0,
        "formula": formula,
        "F": t["F"],
        "B": b_full,
        "W": t["W"],
        "F&B": f_and_b,
    }


def plot(events: list[dict], path: str | Path, title: str = "") -> Path:
    """Draw ranks x time (F of each slot, B, deferred-W B, W and F&B coloured) into a PNG at `path`.

    COMM events (EP exchanges recorded by an MoE stage, `role` F or B) are drawn as thin bars inside the row, so an
    F&B shows one chunk's all-to-all running under the other chunk's compute.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted({e["rank"] for e in events})
    t0 = min(e["start"] for e in events)
    fig, ax = plt.subplots(figsize=(14, 0.6 * len(ranks) + 1.5))
    for e in events:
        if e["op"] == "COMM":  # an EP exchange in flight: a thin bar along the bottom of the rank's row
            start, width = (e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3
            y = e["rank"] + (0.22 if e["role"] == "F" else 0.32)
            ax.broken_barh([(start, width)], (y, 0.08), facecolors=COMM_COLORS[e["role"]], edgecolor="none")
            continue
        if e["op"] == "COMP":
            continue
        key = f"F{e['phase']}" if e["op"] == "F" else ("Bz" if e["op"] == "B" and e["zb"] else e["op"])
        start, width = (e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3
        ax.broken_barh([(start, width)], (e["rank"] - 0.4, 0.8), facecolors=COLORS[key], edgecolor="black", lw=0.4)
        if width > 0:
            ax.text(start + width / 2, e["rank"], e["label"].replace("&", "\n"), ha="center", va="center", fontsize=5)
    ax.set_yticks(ranks)
    ax.set_yticklabels([f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    names = {"F0": "F slot 0", "F1": "F slot 1", "B": "B", "Bz": "B (W deferred)", "W": "W", "FB": "F&B"}
    handles = [Patch(color=c, label=names[k]) for k, c in COLORS.items()]
    if any(e["op"] == "COMM" for e in events):
        handles += [Patch(color=c, label=f"EP all-to-all of the {r} chunk") for r, c in COMM_COLORS.items()]
    ax.legend(handles=handles, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
