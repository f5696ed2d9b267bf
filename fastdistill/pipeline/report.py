"""report.md, PNG plots and the terminal table of a pipeline run."""
from __future__ import annotations

import os

STAGE_LABELS = {"teacher": "teacher", "baseline": "student, no distillation", "distill": "distilled student",
                "prune": "pruned + recovered", "quantize": "int8 + recovered"}


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def table(summary: dict) -> str:
    head = f"{'stage':<26s} {'accuracy':>9s} {'Δ teacher':>10s} {'Δ previous':>11s} {'size':>12s} " \
           f"{'vs teacher':>10s} {'latency':>10s}"
    lines = [head, "-" * len(head)]
    for r in summary["stages"]:
        prev = "" if r["delta_vs_previous"] is None else f"{100 * r['delta_vs_previous']:+.2f} pt"
        lines.append(f"{STAGE_LABELS.get(r['stage'], r['stage']):<26s} {100 * r['accuracy']:8.2f}% "
                     f"{100 * r['delta_vs_teacher']:+7.2f} pt {prev:>11s} {_kb(r['size_bytes']):>12s} "
                     f"{r['size_ratio_vs_teacher']:9.1f}x {r['latency_ms']:8.3f} ms")
    return "\n".join(lines)


def _markdown_table(summary: dict) -> list[str]:
    out = ["| stage | accuracy | Δ vs teacher | Δ vs previous | size on disk | smaller than teacher | "
           "CPU latency / batch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["stages"]:
        prev = "" if r["delta_vs_previous"] is None else f"{100 * r['delta_vs_previous']:+.2f} pt"
        out.append(f"| {STAGE_LABELS.get(r['stage'], r['stage'])} | {100 * r['accuracy']:.2f}% | "
                   f"{100 * r['delta_vs_teacher']:+.2f} pt | {prev} | {_kb(r['size_bytes'])} | "
                   f"{r['size_ratio_vs_teacher']:.1f}× | {r['latency_ms']:.3f} ms |")
    return out


def plots(out_dir: str, summary: dict) -> list[str]:
    """loss.png (training loss per stage), accuracy.png (eval accuracy per stage and epoch),
    size_accuracy.png (size on disk vs accuracy of every stage and the teacher)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    paths = []
    for key, fname, ylabel in (("train_loss", "loss.png", "training loss"),
                               ("accuracy", "accuracy.png", "eval accuracy")):
        fig, ax = plt.subplots(figsize=(7, 4))
        offset = 0
        for stage, hist in summary["histories"].items():
            if not hist:
                continue
            xs = [offset + h["epoch"] + 1 for h in hist]
            ax.plot(xs, [h[key] for h in hist], marker=".", label=STAGE_LABELS.get(stage, stage))
            if stage != "baseline":  # the baseline runs beside distill, on the same epoch axis
                offset = xs[-1]
        ax.set_xlabel("epoch (stages in sequence)")
        ax.set_ylabel(ylabel)
        if key == "train_loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, fname))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in summary["stages"]:
        ax.scatter(r["size_bytes"] / 1024, 100 * r["accuracy"], s=40)
        ax.annotate(STAGE_LABELS.get(r["stage"], r["stage"]), (r["size_bytes"] / 1024, 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (KiB, log scale)")
    ax.set_ylabel("eval accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "size_accuracy.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(out_dir: str, summary: dict) -> str:
    from fastdistill.pipeline.checkpoint import atomic_write_bytes

    images = plots(out_dir, summary)
    lines = ["# fastdistill run report", "", f"Output directory: `{out_dir}`; run time {summary['seconds']:.1f} s.", "",
             *_markdown_table(summary), ""]
    for img in images:
        lines += [f"![{os.path.basename(img)}]({os.path.basename(img)})", ""]
    lines += ["## Weights after every stage", "", "| stage | layer | shape | mean | std | max abs | sparsity |",
              "|---|---|---|---:|---:|---:|---:|"]
    for stage, rows in summary["weight_stats"].items():
        for w in rows:
            lines.append(f"| {stage} | {w['layer']} | {'×'.join(map(str, w['shape']))} | {w['mean']:+.4f} | "
                         f"{w['std']:.4f} | {w['max_abs']:.4f} | {100 * w['sparsity']:.1f}% |")
    skipped = {k: v for k, v in summary["skipped_steps"].items() if v}
    lines += ["", "## Training guards", "",
              f"Skipped steps (non-finite loss or gradient): {skipped or 'none'}.", ""]
    lines += [f"- {e}" for e in summary["events"][:50]]
    lines += ["", "Stage weight hashes (sha256) are in `manifest.json`.", ""]
    path = os.path.join(out_dir, "report.md")
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
