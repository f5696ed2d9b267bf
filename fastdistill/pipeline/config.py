"""The pipeline's configuration: typed sections, YAML loading, and validation that names the key path.

Every error is found before any work starts and reads like `prune.sparsity: must be in [0, 1), got 1.5`
or `distill.temprature: unknown key (expected one of: ...)`. `load_config(path)` reads YAML;
`Config.from_dict(d)` validates a mapping; `config.to_dict()` gives the resolved config (every default
filled in) that the run's manifest records.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "mse")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible; names the key path."""


def _fail(path: str, msg: str):
    raise ConfigError(f"{path}: {msg}")


@dataclass
class Optim:
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    grad_clip: Optional[float] = None  # max global gradient norm; None: no clipping
    max_nonfinite_steps: int = 5  # consecutive skipped steps (NaN/inf loss or gradient) before aborting

    def check(self, path):
        _positive(path, "lr", self.lr)
        _at_least(path, "weight_decay", self.weight_decay, 0.0)
        _positive(path, "batch_size", self.batch_size)
        if self.grad_clip is not None:
            _positive(path, "grad_clip", self.grad_clip)
        _positive(path, "max_nonfinite_steps", self.max_nonfinite_steps)


@dataclass
class Data:
    name: Literal["digits"] = "digits"  # built-in datasets (scikit-learn's bundled digits: no download)
    label_fraction: float = 0.1  # share of the training inputs whose labels the student may use
    test_fraction: float = 0.25
    eval_batch_size: int = 256

    def check(self, path):
        if not 0.0 < self.label_fraction <= 1.0:
            _fail(f"{path}.label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        if not 0.0 < self.test_fraction < 1.0:
            _fail(f"{path}.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _positive(path, "eval_batch_size", self.eval_batch_size)


@dataclass
class Models:
    teacher_hidden: list[int] = field(default_factory=lambda: [512, 512])
    student_hidden: list[int] = field(default_factory=lambda: [128, 128])

    def check(self, path):
        for key in ("teacher_hidden", "student_hidden"):
            widths = getattr(self, key)
            if not widths:
                _fail(f"{path}.{key}", "needs at least one hidden layer width")
            for i, w in enumerate(widths):
                if w <= 0:
                    _fail(f"{path}.{key}[{i}]", f"must be > 0, got {w}")


@dataclass
class Teacher:
    checkpoint: Optional[str] = None  # a safetensors file of the teacher's weights; None: train one
    epochs: int = 40
    optim: Optim = field(default_factory=Optim)

    def check(self, path):
        _at_least(path, "epochs", self.epochs, 0)


@dataclass
class HiddenPair:
    student: str  # module names (as in model.named_modules()) whose outputs are compared
    teacher: str
    kind: Literal["mse", "cosine"] = "mse"
    weight: float = 1.0

    def check(self, path):
        _at_least(path, "weight", self.weight, 0.0)


@dataclass
class Distill:
    epochs: int = 40
    divergence: str = "kl"
    temperature: float = 4.0
    soft_weight: float = 1.0
    hard_weight: float = 0.5
    beta: float = 0.5  # jsd mixture weight
    skew: float = 0.1  # skew_kl / skew_reverse_kl mixture weight
    hidden: list[HiddenPair] = field(default_factory=list)
    baseline: bool = True  # also train the same student without distillation, for the comparison
    optim: Optim = field(default_factory=Optim)

    def check(self, path):
        _at_least(path, "epochs", self.epochs, 1)
        if self.divergence not in DIVERGENCES:
            _fail(f"{path}.divergence", f"must be one of {DIVERGENCES}, got {self.divergence!r}")
        _positive(path, "temperature", self.temperature)
        _at_least(path, "soft_weight", self.soft_weight, 0.0)
        _at_least(path, "hard_weight", self.hard_weight, 0.0)
        for key in ("beta", "skew"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                _fail(f"{path}.{key}", f"must be in [0, 1], got {getattr(self, key)}")


@dataclass
class PruneGroup:
    match: str  # regex on module names (re.search); the first matching group wins
    sparsity: Optional[float] = None  # None: the stage's sparsity
    pattern: Optional[Literal["unstructured", "2:4", "block"]] = None
    skip: bool = False  # leave matching modules dense

    def check(self, path):
        _regex(path, self.match)
        if self.sparsity is not None:
            _sparsity(f"{path}.sparsity", self.sparsity)


@dataclass
class Prune:
    sparsity: float = 0.5
    pattern: Literal["unstructured", "2:4", "block"] = "unstructured"
    block_size: list[int] = field(default_factory=lambda: [16, 16])  # each 16, 32 or 64
    criterion: Literal["magnitude", "wanda"] = "magnitude"
    epochs: int = 10  # recovery epochs with distillation; sparsity ramps over the first `ramp_fraction`
    ramp_fraction: float = 0.5
    every: int = 5  # optimizer steps between mask updates while ramping
    groups: list[PruneGroup] = field(default_factory=list)
    optim: Optim = field(default_factory=lambda: Optim(lr=1e-3))

    def check(self, path):
        _sparsity(f"{path}.sparsity", self.sparsity)
        if len(self.block_size) != 2 or any(b not in (16, 32, 64) for b in self.block_size):
            _fail(f"{path}.block_size", f"must be [bn, bk] with each 16, 32 or 64, got {self.block_size}")
        _at_least(path, "epochs", self.epochs, 1)
        if not 0.0 < self.ramp_fraction <= 1.0:
            _fail(f"{path}.ramp_fraction", f"must be in (0, 1], got {self.ramp_fraction}")
        _positive(path, "every", self.every)


@dataclass
class QuantGroup:
    match: str
    skip: bool = True  # matching modules stay in floating point

    def check(self, path):
        _regex(path, self.match)


@dataclass
class Quantize:
    mode: Literal["w8a8", "w8a16"] = "w8a8"
    group_size: Optional[int] = None  # w8a16 only: per-group weight scales
    smooth_alpha: Optional[float] = 0.5  # SmoothQuant migration strength; None: no calibration
    calibration_batches: int = 8
    epochs: int = 5  # recovery epochs (trainable int8, straight-through) before freezing to int8
    groups: list[QuantGroup] = field(default_factory=list)
    optim: Optim = field(default_factory=lambda: Optim(lr=3e-4))

    def check(self, path):
        if self.group_size is not None:
            _positive(path, "group_size", self.group_size)
            if self.mode != "w8a16":
                _fail(f"{path}.group_size", "per-group scales are for mode 'w8a16' only")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            _fail(f"{path}.smooth_alpha", f"must be in [0, 1], got {self.smooth_alpha}")
        _positive(path, "calibration_batches", self.calibration_batches)
        _at_least(path, "epochs", self.epochs, 0)


@dataclass
class Evaluate:
    latency_batch_size: int = 256
    latency_repeats: int = 30

    def check(self, path):
        _positive(path, "latency_batch_size", self.latency_batch_size)
        _positive(path, "latency_repeats", self.latency_repeats)


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/demo"
    deterministic: bool = True
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # auto: cuda when available; under torchrun, cuda:LOCAL_RANK
    data: Data = field(default_factory=Data)
    models: Models = field(default_factory=Models)
    teacher: Teacher = field(default_factory=Teacher)
    distill: Optional[Distill] = field(default_factory=Distill)
    prune: Optional[Prune] = field(default_factory=Prune)
    quantize: Optional[Quantize] = field(default_factory=Quantize)
    evaluate: Evaluate = field(default_factory=Evaluate)
    export: bool = True

    @classmethod
    def from_dict(cls, data: Any) -> "Config":
        """Validates a (YAML-loaded) mapping; a stage set to null (or `false`) is skipped."""
        return _build(cls, data, "config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def demo_config(seed: int = 0) -> Config:
    """The built-in demo (`fastdistill demo`; examples/pipeline_digits.yaml spells it out): the defaults,
    with the classifier head kept dense and in floating point."""
    cfg = Config(seed=seed)
    cfg.prune.groups = [PruneGroup(match="^head$", skip=True)]
    cfg.quantize.groups = [QuantGroup(match="^head$", skip=True)]
    return cfg


def load_config(path: str) -> Config:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return Config.from_dict({} if data is None else data)


# --- validation machinery -------------------------------------------------------------------------

def _build(cls, data, path):
    if not isinstance(data, dict):
        _fail(path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        _fail(f"{path}.{unknown[0]}", f"unknown key (expected one of: {', '.join(fields)})")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        _fail(f"{path}.{missing[0]}", "required key is missing")
    kwargs = {name: _coerce(hints[name], data[name], f"{path}.{name}") for name in fields if name in data}
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(path)
    return obj


def _coerce(tp, value, path):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]: None (and false for a whole stage) means "off"
        if value is None or (value is False and dataclasses.is_dataclass(args[0])):
            return None
        return _coerce(args[0], value, path)
    if origin is Literal:
        if value not in args:
            _fail(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            _fail(path, f"expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is True else value, path)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config schema: unsupported type {tp} at {path}")  # a bug in this file, not in the config


def _positive(path, key, value):
    if not value > 0:
        _fail(f"{path}.{key}", f"must be > 0, got {value}")


def _at_least(path, key, value, low):
    if not value >= low:
        _fail(f"{path}.{key}", f"must be >= {low}, got {value}")


def _sparsity(path, value):
    if not 0.0 <= value < 1.0:
        _fail(path, f"must be in [0, 1), got {value}")


def _regex(path, pattern):
    import re

    try:
        re.compile(pattern)
    except re.error as e:
        _fail(f"{path}.match", f"not a valid regular expression: {e}")
