"""The run plan: every bad value is one line naming its source and key (exit 2, nothing written);
the result record's schema; file modes; damaged files; θ0's fingerprint."""

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.__main__ import main

ROOT = Path(__file__).parent.parent


def refused(tmp_path, capsys, *args: str, config: str | None = None) -> str:
    """Run `run` with `args` (and a preset with `config`), expect exit 2 and nothing written;
    the single error line."""
    out = tmp_path / "runs"
    extra = []
    if config is not None:
        path = tmp_path / "preset.yaml"
        path.write_text(config)
        extra = ["--config", str(path)]
    assert main(["run", "--profile", "tiny", "--out", str(out), *extra, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out.exists(), "nothing may be written for bad input"
    return err


@pytest.mark.parametrize("line, expected", [
    ("dap_lr: 0", "dap_lr must be positive, got 0.0"),
    ("ft_lr: .inf", "ft_lr must be a finite number, got inf"),
    ("dap_lr: .nan", "dap_lr must be a finite number, got nan"),
    ("max_grad_norm: .nan", "max_grad_norm must be a finite number, got nan"),
    ("mlm_probability: 0", "mlm_probability must be a probability strictly between 0 and 1"),
    ("mlm_probability: 5", "mlm_probability must be a probability strictly between 0 and 1"),
    ("dap_warmup: 7", "dap_warmup must be a fraction in [0, 1], got 7.0"),
    ("dap_steps: true", "dap_steps must be an integer, got True"),
    ("eval_matrix: half", "eval_matrix must be one of 'full', 'diagonal', got 'half'"),
])
def test_meaningless_values_are_refused_with_file_and_key(tmp_path, capsys, line, expected):
    err = refused(tmp_path, capsys, config=f"method: ncl\n{line}\n")
    assert "preset.yaml" in err and expected in err


def test_nan_learning_rate_on_the_command_line(tmp_path, capsys):
    assert "command line: dap_lr must be a finite number, got nan" in refused(
        tmp_path, capsys, "--dap-lr", "nan")


@pytest.mark.parametrize("args, expected", [
    ("{contrast_weight: lots}", "contrast_weight must be a finite number, got 'lots'"),
    ("{temperature: 0}", "method 'das': temperature must be positive, got 0.0"),
    ("{contrast: half}", "contrast must be one of 'full', 'past-only', 'general-only', 'none'"),
    ("{units: [head, neuron]}", "units must be a list, each one of 'head', 'intermediate'"),
])
def test_method_arguments_are_checked_by_their_declared_type(tmp_path, capsys, args, expected):
    err = refused(tmp_path, capsys, config=f"method: das\nmethod_args: {args}\n")
    assert "preset.yaml" in err and expected in err


def test_method_defaults_live_in_args_alone_and_a_variant_yaml_still_applies():
    from methods import available_methods, build_method

    yamls = sorted(p.name for p in (ROOT / "methods").glob("*.yaml"))
    assert yamls == ["dga.yaml"]  # the one registered variant
    assert build_method("dga").args.units == ["head"]
    assert build_method("das").args.units == ["head", "intermediate", "output"]
    for name in available_methods():
        if name.startswith("avl-") and importlib.util.find_spec("avalanche") is None:
            continue  # the [avalanche] extra's rows (tests/test_avalanche.py)
        build_method(name)


def test_non_utf8_config_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("method: ncl\nlabel: café\n".encode("latin-1"))
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert f"{path}: line 2 is not valid UTF-8" in capsys.readouterr().err


def test_missing_base_model_folder(tmp_path, capsys):
    err = refused(tmp_path, capsys, "--base-model", str(tmp_path / "no-model"))
    assert f"base model folder {tmp_path / 'no-model'} does not exist" in err


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["run", "--profile", "tiny", "--out", str(tmp_path / "file" / "runs")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def _read_only(path: Path, monkeypatch) -> None:
    """Make `path` read-only; as root (whom permissions do not stop) `os.access` is told so."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == path
                            else real(p, mode))


def test_read_only_out(tmp_path, capsys, monkeypatch):
    _read_only(tmp_path / "ro", monkeypatch)
    assert main(["run", "--profile", "tiny", "--out", str(tmp_path / "ro" / "runs")]) == 2
    assert f"--out {tmp_path / 'ro' / 'runs'}: {tmp_path / 'ro'} is not writable" in \
        capsys.readouterr().err


def test_read_only_cache_dir_is_found_before_the_base_model_is_pretrained(tmp_path, capsys,
                                                                        monkeypatch):
    import benchmark.basemodel

    def never(*args, **kwargs):
        raise AssertionError("θ0 pretrained although its cache cannot be written")

    monkeypatch.setattr(benchmark.basemodel, "pretrain_syn_base", never)
    monkeypatch.setenv("CDAP_THETA0", "build")  # not the shipped θ0: pretrained and cached
    _read_only(tmp_path / "cache", monkeypatch)
    code = main(["run", "--profile", "tiny", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "--cache-dir" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmark", "run", "--resume", "--overwrite",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def test_files_follow_the_umask(tmp_path):
    from benchmark.atomic import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert list(tmp_path.iterdir()) == [tmp_path / "a.json"]  # no temporary left


def test_old_result_files_load_and_new_ones_carry_schema_and_theta0(tmp_path):
    from benchmark.record import SCHEMA, load

    old = next((ROOT / "results" / "real6" / "real6-default").rglob("result.json"))
    record = load(old)
    assert record.schema == 1 and record.base_fingerprint is None and record.finished
    assert SCHEMA == 3


def _record(tmp_path: Path, name: str, **changes) -> Path:
    base = next((ROOT / "results" / "real6" / "real6-default" / "ncl").rglob("result.json"))
    data = {**json.loads(base.read_text()), **changes}
    path = tmp_path / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_a_damaged_result_is_skipped_with_a_warning_naming_it(tmp_path, capsys, caplog):
    _record(tmp_path, "good")
    bad = tmp_path / "bad" / "result.json"
    bad.parent.mkdir()
    bad.write_text('{"suite": "syn6", "mf1": [[0.5')
    assert main(["table", "--runs", str(tmp_path)]) == 0
    assert "| ncl" in capsys.readouterr().out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(bad) in warnings[0]


def test_table_warns_when_rows_come_from_different_theta0(tmp_path, capsys, caplog):
    _record(tmp_path, "a", base_fingerprint="a" * 64, schema=2)
    _record(tmp_path, "b", base_fingerprint="b" * 64, schema=2, seed=1)
    assert main(["table", "--runs", str(tmp_path)]) == 0
    assert any("2 different base models" in r.getMessage() for r in caplog.records)
    caplog.clear()
    _record(tmp_path, "c", base_fingerprint="a" * 64, schema=2, seed=2)
    (tmp_path / "b" / "result.json").unlink()
    assert main(["table", "--runs", str(tmp_path)]) == 0
    assert not any("base models" in r.getMessage() for r in caplog.records)


THETA0 = """
import sys, torch
from benchmark.basemodel import fingerprint, load_base_model
from tasks import load_suite
torch.set_num_threads(int(sys.argv[2]))
model, _, _ = load_base_model(load_suite("syn6", "tiny"), cache=sys.argv[1], shipped=False)
print(fingerprint(model))
"""


def test_theta0_is_the_same_built_at_one_or_two_threads(tmp_path):
    prints = []
    for threads in (1, 2):
        proc = subprocess.run([sys.executable, "-c", THETA0, str(tmp_path / str(threads)),
                               str(threads)], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        prints.append(proc.stdout.split()[-1])
    assert prints[0] == prints[1] and len(prints[0]) == 64


def test_a_damaged_cached_base_model_is_rebuilt(tmp_path, tiny_suite):
    from benchmark.basemodel import cached_path, fingerprint, load_base_model

    model, _, _ = load_base_model(tiny_suite, cache=str(tmp_path), shipped=False)
    weights = cached_path(tiny_suite, str(tmp_path)) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    again, _, seconds = load_base_model(tiny_suite, cache=str(tmp_path), shipped=False)
    assert seconds > 0, "rebuilt, not reused"
    assert fingerprint(again) == fingerprint(model)
    # the rebuild is reused
    assert load_base_model(tiny_suite, cache=str(tmp_path), shipped=False)[2] == 0.0


def test_theta0_and_every_result_record_the_cpu_that_made_them(tmp_path, tiny_suite):
    import torch

    from benchmark.atomic import read_json
    from benchmark.basemodel import FINGERPRINT, cached_path, cpu_description, load_base_model
    from benchmark.loop import environment

    load_base_model(tiny_suite, cache=str(tmp_path), shipped=False)
    stored = read_json(cached_path(tiny_suite, str(tmp_path)) / FINGERPRINT)
    assert stored["cpu"] == cpu_description() == environment()["cpu"]
    assert stored["cpu"].startswith(torch.backends.cpu.get_cpu_capability())
