"""One line per (op, case) of a benchmark run: fastdistill's fastest provider against the fastest baseline of the
same run. The README's performance tables are generated from the committed runs with it
(benchmarks/update_readme.py); chart.write_summary draws the same lines."""
from __future__ import annotations

from fastdistill.bench.report import fmt_num


def best_rows(result: dict) -> list[dict]:
    """Per (op, case), in run order: op, case, provider (fastdistill's fastest), ms, peak_mb, baseline (the fastest
    baseline), baseline_ms, baseline_peak_mb, ratio (baseline ms / ms: > 1 is faster). Cases where fastdistill or
    every baseline failed are left out."""
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row["op"], row["case"]), []).append(row)
    out = []
    for (op, case), rows in groups.items():
        ours = [r for r in rows if r.get("kind") == "fastdistill" and r.get("ratio")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r["ratio"])
        base = next(r for r in rows if r["provider"] == best["baseline"])
        out.append(dict(op=op, case=case, provider=best["provider"], ms=best["ms"], peak_mb=best.get("peak_mb"),
                        baseline=base["provider"], baseline_ms=base["ms"], baseline_peak_mb=base.get("peak_mb"),
                        ratio=best["ratio"]))
    return out


def _mb(v) -> str:
    return "" if v is None else f"{v:.1f}"


def markdown(result: dict, source: str) -> str:
    """A markdown table of best_rows with the machine, versions and date it came from; `source` names the file."""
    env = result.get("environment", {})
    lines = [f"{env.get('device', result.get('device', ''))}, torch {env.get('torch', '')}, "
             f"{result.get('shapes', '')} shapes, median of {result.get('reps', '')} calls, {env.get('date', '')} "
             f"(`{source}`; speed-up > 1: fastdistill is faster than the fastest baseline measured in the same run):",
             "",
             "| op | case | fastdistill | ms | peak MB | fastest baseline | ms | peak MB | speed-up |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in best_rows(result):
        lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {fmt_num(r['ms'])} | {_mb(r['peak_mb'])} | "
                     f"{r['baseline']} | {fmt_num(r['baseline_ms'])} | {_mb(r['baseline_peak_mb'])} | "
                     f"{fmt_num(r['ratio'])}x |")
    return "\n".join(lines)
