"""Regression guard on speed-up ratios: a run against a committed baseline run (both runner.run dicts).

Times move with the machine and its load; ratios measured side by side in one run (fastdistill vs eager, compile or
a peer) move much less. For every fastdistill row of the baseline run, compare() takes its speed-up over each
baseline provider both runs timed (from the 20th-percentile times, steadier than medians on a shared machine) and
divides the current run's by the baseline run's. A slower kernel lowers all of these alike, while one baseline's
fluke (a process that happened to run torch.compile's code slowly) moves one, so the row's change is the best
of them; below 1 - margin the row is "slower" and the check fails. A row that is missing, failed, or has no
baseline timed in both runs fails too (nothing is silently dropped). Rows only the current run has are "new".

    fastdistill bench --check benchmarks/results/bench_cpu_small.json   (make bench-check)
"""
from __future__ import annotations

import math

from fastdistill.bench.report import fmt_num, text_table

# Same code, idle 2-core dev machine, 4 runs of the small CPU suite: the worst drop of a row's change was 24% (a
# single baseline's ratio from medians dropped 48%). 0.4 keeps clear of that; a kernel 1.7x slower fails.
DEFAULT_MARGIN = 0.4
FAILING = ("slower", "missing", "failed", "no baseline")
COLUMNS = ("op", "case", "provider", "vs", "baseline ratio", "now", "change", "status")


def _key(row: dict) -> tuple:
    return row["op"], row["case"], row["provider"]


def _ratio(value) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def check_comparable(baseline: dict, current: dict) -> None:
    """ValueError naming `baseline` when the two runs measured different things (device, shapes)."""
    for field in ("device", "shapes"):
        if baseline.get(field) != current.get(field):
            raise ValueError(f"baseline: measured {field} {baseline.get(field)!r}, this run {current.get(field)!r}: "
                             f"ratios of different {field} are not comparable")


def _time(row: dict) -> float | None:
    return _ratio(row.get("p20_ms")) or _ratio(row.get("ms")) if "error" not in row else None


def _speedups(rows: dict, key: tuple) -> dict:
    """{baseline provider: its time / the fastdistill row's time} within the row's case, from timed rows only."""
    mine = _time(rows[key])
    if mine is None:
        return {}
    out = {}
    for (op, case, provider), row in rows.items():
        if (op, case) == key[:2] and row.get("kind") != "fastdistill" and _time(row) is not None:
            out[provider] = _time(row) / mine
    return out


def compare(baseline: dict, current: dict, margin: float = DEFAULT_MARGIN) -> list[dict]:
    """One entry per fastdistill row of either run: op, case, provider, vs (the baseline provider whose speed-up
    changed least badly), was and now (speed-ups over `vs`: > 1 is faster), change (now / was) and status (ok,
    faster, slower, missing, failed, no baseline, new)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < 1:
        raise ValueError(f"margin: expected a fraction in (0, 1), got {margin!r}")
    check_comparable(baseline, current)
    was_rows, now_rows = ({_key(r): r for r in run["rows"]} for run in (baseline, current))
    entries, seen = [], set()
    for key, row in was_rows.items():
        was_all = _speedups(was_rows, key) if row.get("kind") == "fastdistill" else {}
        if not was_all:
            continue
        seen.add(key)
        entry = dict(zip(("op", "case", "provider"), key), vs=row.get("baseline"), was=None, now=None, change=None)
        now_row = now_rows.get(key)
        if now_row is None:
            entries.append(dict(entry, status="missing"))
            continue
        if "error" in now_row:
            entries.append(dict(entry, status="failed"))
            continue
        now_all = _speedups(now_rows, key)
        common = [p for p in was_all if p in now_all]
        if not common:
            entries.append(dict(entry, status="no baseline"))
            continue
        vs = max(common, key=lambda p: now_all[p] / was_all[p])
        change = now_all[vs] / was_all[vs]
        status = "slower" if change < 1 - margin else "faster" if change > 1 + margin else "ok"
        entries.append(dict(entry, vs=vs, was=was_all[vs], now=now_all[vs], change=change, status=status))
    for key, row in now_rows.items():
        if key not in seen and row.get("kind") == "fastdistill" and _ratio(row.get("ratio")) is not None:
            entries.append(dict(zip(("op", "case", "provider"), key), vs=row["baseline"], was=None,
                                now=row["ratio"], change=None, status="new"))
    return entries


def failed(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e["status"] in FAILING]


def table(entries: list[dict], margin: float = DEFAULT_MARGIN) -> str:
    """The comparison as a text table with a verdict line."""
    cells = [[e["op"], e["case"], e["provider"], e["vs"], *(f"{fmt_num(e[k])}x" if e[k] else ""
                                                            for k in ("was", "now", "change")), e["status"]]
             for e in entries]
    out = text_table(COLUMNS, cells, numeric={4, 5, 6})
    bad = failed(entries)
    compared = sum(e["status"] != "new" for e in entries)
    out.append("")
    out.append(f"bench-check: {len(bad)} of {compared} ratios worse than the baseline's by more than {margin:.0%} "
               f"(or not measured): FAILED" if bad else
               f"bench-check: all {compared} ratios within {margin:.0%} of the baseline's (or better): OK")
    return "\n".join(out)
