"""The pytest-benchmark suite over every op (`make bench-suite`; README: Performance): the cases and providers of
fastdistill.bench (the ones `fastdistill bench` runs), timed by pytest-benchmark, with peak memory and the speed-up
over every baseline of the same session in each benchmark's extra_info. At the end it prints fastdistill bench's
table of the session and, with --bench-json, writes it in fastdistill bench's JSON format (what
`fastdistill bench --check` and benchmarks/update_readme.py read)."""
from __future__ import annotations

import pytest

from fastdistill.bench import report, runner
from fastdistill.bench.cases import OPS

ROWS: list[dict] = []  # this session's rows, in run order (runner.make_row)
SETTINGS: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("fastdistill bench suite")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    group.addoption("--bench-shapes", choices=("small", "llm", "tiny"), default="small",
                    help="small (default), llm (the GPU targets) or tiny (a smoke test)")
    group.addoption("--bench-op", action="append", choices=OPS, help="only this op (repeatable; default every op)")
    group.addoption("--bench-reps", type=int, help="timed rounds per provider (default 5 on CPU, 20 on CUDA)")
    group.addoption("--bench-memory", choices=("worker", "none"), default="worker",
                    help="peak memory in a fresh worker per case with exact RSS (default), or not measured")
    group.addoption("--bench-json", metavar="PATH", help="also write the session as a fastdistill bench JSON run")


def pytest_configure(config):
    device = config.getoption("--bench-device")
    reps = config.getoption("--bench-reps") or runner.DEFAULT_REPS[device]
    if reps < 1:
        raise pytest.UsageError(f"--bench-reps: expected a positive integer, got {reps}")
    SETTINGS.update(device=device, shapes=config.getoption("--bench-shapes"), reps=reps,
                    ops=config.getoption("--bench-op"), memory=config.getoption("--bench-memory"),
                    json=config.getoption("--bench-json"))


def pytest_generate_tests(metafunc):
    if "pair" not in metafunc.fixturenames:
        return
    try:
        pairs = runner.plan(SETTINGS["ops"], device=SETTINGS["device"], shapes=SETTINGS["shapes"])
    except ValueError as e:
        raise pytest.UsageError(f"--bench-{e}") from None
    # Baselines first within each case, so a fastdistill provider's speed-ups are known when it finishes.
    order = {(c.op, c.name): i for i, (c, _) in reversed(list(enumerate(pairs)))}
    pairs.sort(key=lambda cp: (order[(cp[0].op, cp[0].name)], cp[0].provider(cp[1]).kind == "fastdistill"))
    metafunc.parametrize("pair", pairs, ids=[f"{c.op}[{c.name}]-{p}" for c, p in pairs])


def session_result() -> dict:
    from fastdistill.bench import harness

    return {"environment": harness.environment(SETTINGS["device"]), "device": SETTINGS["device"],
            "shapes": SETTINGS["shapes"], "reps": SETTINGS["reps"], "isolate": "none",
            "rows": runner.add_ratios([dict(r) for r in ROWS])}


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    result = session_result()
    terminalreporter.write_sep("=", "fastdistill bench: every op, ratio to the fastest baseline of this session")
    terminalreporter.write_line(report.table(result))
    if SETTINGS["json"]:
        terminalreporter.write_line(f"wrote {report.write_json(SETTINGS['json'], result)}")
