"""Readable output of a benchmark run (runner.run's dict): one text table over every op, and the JSON / CSV files.

The JSON file holds the whole run (environment, settings, rows) and reads back unchanged; the CSV has one line
per row with the environment repeated in every line (device, versions, date), as benchmarks/results/*.csv.
"""
from __future__ import annotations

import json
import math

from fastdistill.bench import harness

COLUMNS = ("op", "case", "provider", "ms", "GB/s", "TFLOP/s", "peak MB", "vs best baseline")
FORMAT_VERSION = 1


def fmt_num(v, digits: int = 3) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return ""
    return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"


def _cells(row: dict) -> list[str]:
    if "error" in row:
        timing = ["failed", "", "", ""]
    else:
        timing = [fmt_num(row.get("ms")), fmt_num(row.get("gbps")), fmt_num(row.get("tflops")),
                  "" if row.get("peak_mb") is None else f"{row['peak_mb']:.1f}"]
    ratio = row.get("ratio")
    vs = f"{fmt_num(ratio)}x {row['baseline']}" if ratio is not None and "error" not in row else ""
    return [row["op"], row["case"], row["provider"], *timing, vs]


def text_table(columns, lines: list[list[str]], numeric: set[int]) -> list[str]:
    """Header, rule and one padded line per row; the `numeric` columns right-aligned."""
    lines = [list(columns)] + lines
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.rjust(w) if i in numeric and n else c.ljust(w)
                             for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def table(result: dict) -> str:
    """The run as a text table (ratio > 1: faster than the fastest baseline measured in the same run), with the
    environment on top and the failures listed under it."""
    env = result.get("environment", {})
    head = (f"{env.get('device', result.get('device', ''))} | torch {env.get('torch', '')} | "
            f"triton {env.get('triton') or '-'} | fastdistill {env.get('fastdistill', '')} | "
            f"shapes {result.get('shapes', '')}, {result.get('reps', '')} reps"
            f"{', in-process' if result.get('isolate') == 'none' else ''}")
    out = [head, *text_table(COLUMNS, [_cells(r) for r in result["rows"]], numeric={3, 4, 5, 6})]
    failed = [r for r in result["rows"] if "error" in r]
    if failed:
        out.append("")
        out += [f"failed: {r['op']} [{r['case']}] {r['provider']}: {r['error']}" for r in failed]
    return "\n".join(out)


def write_json(path: str, result: dict) -> str:
    with open(path, "w") as f:
        json.dump({"format": FORMAT_VERSION, **result}, f, indent=1)
        f.write("\n")
    return path


def read_json(path: str) -> dict:
    """A run written by write_json; ValueError naming the path when it is not one."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"path: {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"path: {path} is not a fastdistill bench result (no 'rows' list)")
    if data.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"path: {path} has format {data['format']}, newer than this fastdistill reads "
                         f"({FORMAT_VERSION})")
    data.pop("format", None)
    return data


def csv_rows(result: dict) -> list[dict]:
    """The CSV lines: the environment and run settings, then the row (ratios as a JSON object)."""
    meta = {**result.get("environment", {}), "shapes": result.get("shapes"), "reps": result.get("reps")}
    return [{**meta, **{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()}}
            for r in result["rows"]]


def write_csv(path: str, result: dict) -> str:
    return harness.write_rows_csv(path, csv_rows(result))
