"""The distill → prune → quantize workflow: `Pipeline(...).run()`, its config, and the built-in digits run."""
from fastdistill.pipeline.checkpoint import CheckpointError
from fastdistill.pipeline.config import Config, ConfigError, demo_config, load_config
from fastdistill.pipeline.pipeline import Pipeline
from fastdistill.pipeline.train import NonFiniteError


def resolve_device(name: str):
    """"cpu", "cuda" (this process's GPU under torchrun: LOCAL_RANK) or "auto" (cuda when available)."""
    import os

    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("config.device: 'cuda' but torch sees no CUDA device")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_builtin(config: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """Runs the pipeline on the built-in dataset and models that `config.data` / `config.models` name."""
    from fastdistill.pipeline.data import load_digits, make_mlp
    from fastdistill.pipeline.repro import derive_seed

    device = resolve_device(config.device)
    (x, y, y_student), test = load_digits(config.seed, config.data.test_fraction, config.data.label_fraction)
    teacher = make_mlp(x.shape[1], config.models.teacher_hidden, 10, derive_seed(config.seed, "teacher-init"))
    student = make_mlp(x.shape[1], config.models.student_hidden, 10, derive_seed(config.seed, "student-init"))
    x, y, y_student = x.to(device), y.to(device), y_student.to(device)
    test = tuple(t.to(device) for t in test)
    teacher, student = teacher.to(device), student.to(device)
    return Pipeline(teacher, student, (x, y, y_student), test, config, resume=resume, progress=progress).run()


__all__ = ["CheckpointError", "Config", "ConfigError", "NonFiniteError", "Pipeline", "demo_config", "load_config",
           "resolve_device", "run_builtin"]
