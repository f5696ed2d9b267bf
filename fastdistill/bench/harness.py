"""The one benchmark timing core: `fastdistill bench` (fastdistill.bench.runner) and the scripts
benchmarks/bench_<op>.py (through benchmarks/harness.py, a re-export) both time with it.

Each (provider, mode) measurement runs in a fresh subprocess so that peak memory is its own:
CUDA peak from torch.cuda.max_memory_allocated, CPU peak from sampling the resident set size, both
minus what the inputs already held. Times are medians (with 20th/80th percentiles) of timed repetitions
after warmup; CUDA times use events. Results go to benchmarks/results/<name>.csv with the device,
versions and date of the run, so every number in the README can be traced to a file.
From an installed wheel there is no source tree: RESULTS is None and write_csv needs a directory.
"""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch



def _source_results() -> str | None:
    """<checkout>/benchmarks/results when this package runs from a source checkout (editable install)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bench = os.path.join(root, "benchmarks")
    return os.path.join(bench, "results") if os.path.isfile(os.path.join(bench, "harness.py")) else None


RESULTS = _source_results()


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def environment(device: str) -> dict:
    try:
        from importlib.metadata import version
        triton_version = version("triton")
    except Exception:  # triton not installed
        triton_version = ""
    import fastdistill

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "fastdistill": fastdistill.__version__}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(fn, *, device: str, warmup: int, reps: int, setup=None) -> list[float]:
    """Milliseconds per call of fn() (setup() runs untimed before each call)."""
    times = []
    for i in range(warmup + reps):
        arg = setup() if setup else None
        _sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn(arg)
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return times


def _release_free_heap() -> None:
    """Returns glibc's retained free heap memory to the OS. Blocks under the malloc mmap threshold
    (which grows to 32 MiB after large frees) are recycled from the heap without touching the RSS,
    so without this a chunked provider reusing warm-up memory would look as if it allocated nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakMemory:
    """Peak extra memory while the block runs, over what was held when it started.
    CUDA: the caching allocator's peak. CPU: a thread samples the resident set size every 0.2 ms
    (large tensors are mmapped, so freed memory leaves the RSS and the samples see real peaks)."""

    def __init__(self, device: str):
        self.device, self.extra = device, 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.0002)

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            self._base = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.extra = max(0, self._peak - self._base)
        return False


def summarize(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[-1]}


def copy_bandwidth_gbps(device: str, nbytes: int, reps: int = 10) -> float:
    """Read + write bandwidth of a plain tensor copy of nbytes: the roofline for memory-bound ops."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_it(lambda _: dst.copy_(src), device=device, warmup=3, reps=reps)
    return 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9


def run_worker(script: str, spec: dict, timeout: int = 1800, exact_rss: bool = True) -> dict:
    """Runs `script --worker '<json spec>'` and returns the JSON dict it prints last. exact_rss=False leaves
    glibc's heap as users run it: time sub-millisecond CPU calls that way (see _run_json)."""
    return _run_json([script, "--worker", json.dumps(spec)], timeout, exact_rss)


def run_module_worker(module: str, spec: dict, timeout: int = 1800, exact_rss: bool = True) -> dict:
    """Runs `python -m module '<json spec>'` (works from an installed wheel) and returns its last JSON dict.
    exact_rss as in run_worker."""
    return _run_json(["-m", module, json.dumps(spec)], timeout, exact_rss)


def _run_json(args: list[str], timeout: int, exact_rss: bool = True) -> dict:
    # glibc: every allocation >= 64 KiB is its own mapping, unmapped when freed, so the sampled RSS
    # is the live memory (no heap reuse hiding chunked allocations, no retained free memory). It also turns each
    # such allocation into mmap + page faults + munmap: sub-millisecond CPU calls time 3-4x slower under it
    # (the demo MLP: fp32 0.2 ms, int8 0.77 ms vs 0.16 ms for both as users run them).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if exact_rss else dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def write_csv(name: str, rows: list[dict], directory: str | None = None) -> str:
    """Writes <directory>/<name>.csv (default: benchmarks/results of the source checkout)."""
    directory = directory or RESULTS
    if directory is None:
        raise ValueError("directory: no source checkout (benchmarks/results) here; pass a directory")
    os.makedirs(directory, exist_ok=True)
    return write_rows_csv(os.path.join(directory, f"{name}.csv"), rows)


def write_rows_csv(path: str, rows: list[dict]) -> str:
    """One CSV row per dict; the columns are every key in order of first appearance."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def describe(result: dict) -> str:
    """One measurement as printed by the benchmarks: time and peak memory, or why it failed."""
    if "error" in result:
        return f"failed: {result['error']}"
    return f"{result['median_ms']:9.2f} ms  peak +{result['peak_mem_mb']:8.1f} MB"


def liger_installed() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def finish(name: str, results: list[dict], csv_dir: str | None, columns: list[str]) -> str:
    """Writes benchmarks/results/<name>.csv (and a copy under csv_dir) and prints the summary table."""
    path = write_csv(name, results)
    if csv_dir:
        write_csv(name, results, csv_dir)
    print(f"\nwrote {path}\n")
    print_table([r for r in results if "median_ms" in r], columns)
    return path
