"""Pipeline config: defaults, YAML loading, and errors that name the key path before any work starts."""
import pytest

from fastdistill.cli import main
from fastdistill.pipeline import Config, ConfigError, demo_config, load_config


def test_defaults_resolve_and_round_trip():
    cfg = Config.from_dict({})
    assert cfg == Config() and Config.from_dict(cfg.to_dict()) == cfg
    assert 0.5 <= cfg.prune.sparsity < 1 and cfg.quantize.mode in ("w8a8", "w8a16")


def test_stage_off_with_null_or_false():
    cfg = Config.from_dict({"prune": None, "quantize": False})
    assert cfg.prune is None and cfg.quantize is None


@pytest.mark.parametrize("data, path", [
    ({"prune": {"sparsity": 1.5}}, "config.prune.sparsity: must be in [0, 1)"),
    ({"distill": {"temprature": 2.0}}, "config.distill.temprature: unknown key"),
    ({"distill": {"temperature": 0}}, "config.distill.temperature: must be > 0"),
    ({"distill": {"divergence": "l2"}}, "config.distill.divergence"),
    ({"seed": "zero"}, "config.seed: expected an integer"),
    ({"deterministic": 1}, "config.deterministic: expected true or false"),
    ({"teacher": {"optim": {"lr": -1}}}, "config.teacher.optim.lr: must be > 0"),
    ({"distill": {"hidden": [{"student": "body.1"}]}}, "config.distill.hidden[0].teacher: required key"),
    ({"distill": {"hidden": [{"student": "a", "teacher": "b", "kind": "l1"}]}}, "config.distill.hidden[0].kind"),
    ({"prune": {"groups": [{"match": "("}]}}, "config.prune.groups[0].match: not a valid regular expression"),
    ({"prune": {"block_size": [16, 8]}}, "config.prune.block_size"),
    ({"prune": {"pattern": "3:4"}}, "config.prune.pattern"),
    ({"quantize": {"mode": "w4a4"}}, "config.quantize.mode"),
    ({"quantize": {"group_size": 32}}, "config.quantize.group_size: per-group scales are for mode 'w8a16'"),
    ({"models": {"student_hidden": [16, 0]}}, "config.models.student_hidden[1]: must be > 0"),
    ({"data": {"label_fraction": 0}}, "config.data.label_fraction"),
    ([1, 2], "config: expected a mapping"),
])
def test_errors_name_the_key_path(data, path):
    with pytest.raises(ConfigError) as err:
        Config.from_dict(data)
    assert path in str(err.value)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  sparsity: 1.5\n")
    with pytest.raises(ConfigError, match="prune.sparsity"):
        load_config(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("prune: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))
    assert load_config(str(_write(tmp_path, ""))) == Config()


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    path = _write(tmp_path, f"output_dir: {tmp_path / 'out'}\nprune:\n  sparsity: 1.5\n")
    assert main(["run", str(path)]) == 2
    assert "prune.sparsity: must be in [0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_example_config_is_valid():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "examples", "pipeline_digits.yaml"))
    assert cfg == demo_config()  # the example documents exactly what `fastdistill demo` runs


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path
