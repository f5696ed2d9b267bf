"""One PNG bar chart per op of a benchmark run: for each case, every provider's speed against the fastest
baseline of the same run (1 = as fast as it; fastdistill's bars in one colour, the baselines in another).
Needs matplotlib (the `pipeline` extra); missing() says why not before anything runs."""
from __future__ import annotations

import os
from typing import Optional

COLORS = {"fastdistill": "#1f77b4", "eager": "#9e9e9e", "compile": "#7f7f7f", "peer": "#ff7f0e"}


def missing() -> Optional[str]:
    """Why charts cannot be drawn here (None: they can)."""
    try:
        import matplotlib  # noqa: F401  (pyflakes: only whether it imports)
    except ImportError:
        return "needs matplotlib (pip install matplotlib, or fastdistill[pipeline])"
    return None


def write_charts(result: dict, directory: str) -> list[str]:
    """Writes <directory>/bench_<op>_<device>.png for every op with timed rows; returns the paths."""
    why = missing()
    if why is not None:
        raise ModuleNotFoundError(f"chart: {why}")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    device = result.get("device", "")
    by_op: dict[str, dict[str, list[dict]]] = {}
    for row in result["rows"]:
        if row.get("ratio") is not None:
            by_op.setdefault(row["op"], {}).setdefault(row["case"], []).append(row)
    paths = []
    for op, groups in by_op.items():
        height = sum(len(rows) for rows in groups.values()) * 0.32 + len(groups) * 0.6 + 0.6
        fig, axes = plt.subplots(len(groups), 1, figsize=(8, height), squeeze=False)
        for ax, (case, rows) in zip(axes[:, 0], groups.items()):
            names = [r["provider"] for r in rows]
            ratios = [r["ratio"] for r in rows]
            bars = ax.barh(names, ratios, color=[COLORS.get(r["kind"], "#333333") for r in rows])
            ax.bar_label(bars, labels=[f"{r['ratio']:.2f}x  ({r['ms']:.3g} ms)" for r in rows], fontsize=7,
                         padding=2)
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.invert_yaxis()
            if max(ratios) / min(ratios) > 20:  # 100x apart: a log axis keeps the small bars readable
                ax.set_xscale("log")
                ax.set_xlim(min(ratios) / 2, max(ratios) * 6)
            else:
                ax.set_xlim(0, max(ratios) * 1.35)
            ax.set_title(case, fontsize=9)
            ax.tick_params(labelsize=8)
        axes[-1, 0].set_xlabel(f"speed vs the fastest baseline (x, higher is faster) - {device}")
        env = result.get("environment", {})
        fig.suptitle(f"{op} | {env.get('device', device)} | torch {env.get('torch', '')}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(directory, f"bench_{op}_{device or 'device'}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_summary(result: dict, path: str) -> str:
    """One PNG for the whole run: per (op, case), fastdistill's fastest provider's speed-up over the fastest
    baseline of the same run (summary.best_rows; log axis, 1 = as fast)."""
    why = missing()
    if why is not None:
        raise ModuleNotFoundError(f"chart: {why}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastdistill.bench.summary import best_rows

    rows = best_rows(result)
    if not rows:
        raise ValueError("result: no case has both a timed fastdistill provider and a timed baseline")
    labels = [f"{r['op']} [{r['case']}]" for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(rows) + 1.2))
    bars = ax.barh(labels, ratios, color=[COLORS["fastdistill"] if x >= 1 else COLORS["peer"] for x in ratios])
    ax.bar_label(bars, labels=[f"{x:.2f}x vs {r['baseline']}" for x, r in zip(ratios, rows)], fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(min(min(ratios), 1.0) / 2, max(max(ratios), 1.0) * 8)
    ax.invert_yaxis()
    ax.tick_params(labelsize=7)
    env = result.get("environment", {})
    ax.set_xlabel("fastdistill's speed-up over the fastest baseline of the same run (x, log scale)", fontsize=8)
    ax.set_title(f"{env.get('device', result.get('device', ''))} | torch {env.get('torch', '')} | "
                 f"{result.get('shapes', '')} shapes | {env.get('date', '')}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
