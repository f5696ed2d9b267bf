"""The built-in pipeline (`fastdistill demo`) over several seeds: the README's pipeline table.

    python benchmarks/bench_pipeline.py --seeds 0 1 2

Per seed and stage: accuracy, size on disk, CPU latency per batch of 256, wall time; then the
means over seeds and the issue's checks (distillation beats the label-only student on average;
the final pruned + int8 student is within 1.0 point of the distilled fp32 student, at least 4x
smaller than the teacher and faster per batch). CSV: benchmarks/results/pipeline_digits_cpu.csv.
"""
import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="pipeline_digits_cpu")
    p.add_argument("--csv-dir", default=None)
    args = p.parse_args()

    from fastdistill.pipeline import demo_config, run_builtin

    rows, per_seed = [], {}
    for seed in args.seeds:
        cfg = demo_config(seed)
        cfg.output_dir = tempfile.mkdtemp(prefix=f"fd_pipeline_{seed}_")
        summary = run_builtin(cfg, progress=False)
        per_seed[seed] = {r["stage"]: r for r in summary["stages"]}
        for r in summary["stages"]:
            rows.append({**harness.environment("cpu"), "seed": seed, "stage": r["stage"], "accuracy": round(r["accuracy"], 5),
                         "size_bytes": r["size_bytes"], "latency_ms": round(r["latency_ms"], 4),
                         "run_seconds": round(summary["seconds"], 1)})
        print(f"seed {seed}: " + ", ".join(f"{r['stage']} {100 * r['accuracy']:.2f}%" for r in summary["stages"])
              + f" ({summary['seconds']:.1f} s)", flush=True)

    def mean(stage, key):
        return statistics.mean(per_seed[s][stage][key] for s in per_seed)

    print()
    print(f"{'stage':<10s} {'accuracy':>9s} {'size KiB':>9s} {'latency ms':>11s}   (mean of {len(per_seed)} seeds)")
    for stage in per_seed[args.seeds[0]]:
        print(f"{stage:<10s} {100 * mean(stage, 'accuracy'):8.2f}% {mean(stage, 'size_bytes') / 1024:9.1f} "
              f"{mean(stage, 'latency_ms'):11.3f}")
    final = "quantize" if "quantize" in per_seed[args.seeds[0]] else "prune"
    checks = {
        "distill beats baseline (mean)": mean("distill", "accuracy") > mean("baseline", "accuracy"),
        "final within 1.0 pt of distilled": mean(final, "accuracy") >= mean("distill", "accuracy") - 0.01,
        "final >= 4x smaller than teacher": mean("teacher", "size_bytes") >= 4 * mean(final, "size_bytes"),
        "final faster than teacher": mean(final, "latency_ms") < mean("teacher", "latency_ms"),
    }
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    print("wrote", harness.write_csv(args.out, rows))
    if args.csv_dir:
        harness.write_csv(args.out, rows, args.csv_dir)


if __name__ == "__main__":
    main()
