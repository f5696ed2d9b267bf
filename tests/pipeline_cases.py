"""A tiny pipeline config (seconds on 2 CPU cores) shared by the pipeline tests."""
import copy

from fastdistill.pipeline import Config

_OPTIM = {"batch_size": 128, "lr": 0.01}
TINY = {
    "models": {"teacher_hidden": [32], "student_hidden": [16, 16]},
    "teacher": {"epochs": 2, "optim": _OPTIM},
    "distill": {"epochs": 2, "optim": _OPTIM, "hidden": [{"student": "body.1", "teacher": "body.1", "weight": 0.1}]},
    "prune": {"epochs": 2, "sparsity": 0.5, "every": 2, "optim": _OPTIM,
              "groups": [{"match": "^head$", "skip": True}]},
    "quantize": {"epochs": 1, "calibration_batches": 2, "optim": _OPTIM, "groups": [{"match": "^head$", "skip": True}]},
    "evaluate": {"latency_repeats": 2, "latency_batch_size": 64},
}


def tiny_config(out_dir, **overrides) -> Config:
    data = copy.deepcopy(TINY)
    for key, value in overrides.items():
        data[key] = value
    data["output_dir"] = str(out_dir)
    return Config.from_dict(data)
