"""`python -m fastdistill.bench.worker '<json spec>'`: one (case, provider) measurement in a fresh process
(runner.run(isolate=True) starts it); prints one JSON line: the timings and peak memory, or the error."""
from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    from fastdistill.bench.runner import measure_spec

    (spec,) = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure_spec(json.loads(spec))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
