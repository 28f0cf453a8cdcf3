"""θ0 shipped as files (benchmark/theta0), the kernel setting every result records, and
`reproduce`, which reruns a result and compares it bit for bit."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmark import basemodel
from benchmark.__main__ import main
from benchmark.config import ConfigError
from benchmark.kernels import PINNED, hardware_isa, kernel_setting, pinned
from benchmark.record import load
from benchmark.reproduce import differences
from tasks import load_suite, synthetic

ROOT = Path(__file__).parent.parent
# a tiny row made from the shipped syn6-tiny θ0 with default kernels on an AVX512 AMD EPYC
COMMITTED = ROOT / "tests" / "data" / "reproduce" / "syn6-tiny" / "ncl" / "order0" / "seed2021" \
    / "result.json"


def test_every_synthetic_suite_and_profile_has_a_shipped_theta0_of_the_recorded_size():
    manifest = basemodel.shipped_manifest()
    for name, profiles in synthetic.SUITE_PROFILES.items():
        for profile in profiles:
            found = basemodel.shipped_for(load_suite(name, profile))
            assert found is not None, f"{name}/{profile} has no shipped θ0"
            entry = manifest[found[0]]
            path = basemodel.SHIPPED / entry["file"]
            assert path.stat().st_size == entry["bytes"] < 5_000_000
            assert (entry["suite"], entry["profile"]) == (name, profile)


def test_runs_load_the_shipped_theta0_without_pretraining(tiny_suite, monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("θ0 pretrained although a shipped file matches")

    monkeypatch.setattr(basemodel, "pretrain_syn_base", never)
    name, entry = basemodel.shipped_for(tiny_suite)
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    model, tokenizer, seconds = basemodel.load_base_model(tiny_suite, cache=str(tmp_path))
    assert seconds == 0.0 and basemodel.fingerprint(model) == entry["sha256"]
    assert torch.equal(state, torch.random.get_rng_state())  # the run's RNG is left alone
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert basemodel.shipped_name(entry["sha256"]) == name
    assert basemodel.shipped_name("0" * 64) is None
    assert not list(tmp_path.iterdir())  # nothing cached
    monkeypatch.setenv(basemodel.SHIPPED_ENV, "build")  # the variant: pretrain here
    with pytest.raises(AssertionError, match="pretrained"):
        basemodel.load_base_model(tiny_suite, cache=str(tmp_path))


def test_a_changed_spec_does_not_load_the_shipped_theta0(tiny_suite):
    changed = copy.copy(tiny_suite)
    changed.base_model = {**tiny_suite.base_model, "pretrain_steps": 31}
    assert basemodel.shipped_for(tiny_suite) is not None
    assert basemodel.shipped_for(changed) is None
    changed.base_model = dict(tiny_suite.base_model)
    changed.vocabulary = tiny_suite.vocabulary[:-1] + ["zzz"]
    assert basemodel.shipped_for(changed) is None


def test_a_damaged_shipped_file_is_refused_naming_it(tiny_suite, tmp_path):
    folder = tmp_path / "theta0"
    shutil.copytree(basemodel.SHIPPED, folder)
    name, entry = basemodel.shipped_for(tiny_suite, folder)
    model, _ = basemodel.load_shipped(tiny_suite, name, entry, folder)  # the copy loads
    data = bytearray((folder / entry["file"]).read_bytes())
    data[-5] ^= 1  # one bit of one weight
    (folder / entry["file"]).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"{name}.*damaged"):
        basemodel.load_shipped(tiny_suite, name, entry, folder)
    # a manifest whose fingerprint is not the weights' (the file hash updated with the bytes)
    entry = {**entry, "file_sha256": basemodel.sha256_file(folder / entry["file"])}
    with pytest.raises(ConfigError, match="do not match the manifest's fingerprint"):
        basemodel.load_shipped(tiny_suite, name, entry, folder)


def test_write_shipped_round_trips_and_records_build_key_cpu_and_kernels(tiny_suite, tmp_path):
    name, entry = basemodel.shipped_for(tiny_suite)
    model, _ = basemodel.load_shipped(tiny_suite, name, entry)
    written = basemodel.write_shipped(model, tiny_suite, "copy", tmp_path)
    assert written["sha256"] == entry["sha256"] and written["key"] == entry["key"]
    assert written["cpu"] == basemodel.cpu_description()
    assert written["kernels"] == kernel_setting()
    assert basemodel.shipped_manifest(tmp_path) == {"copy": written}
    again, _ = basemodel.load_shipped(tiny_suite, "copy", written, tmp_path)
    assert basemodel.fingerprint(again) == entry["sha256"]


def test_base_build_says_whether_this_machine_rebuilds_the_shipped_bits(capsys, monkeypatch,
                                                                        tiny_suite):
    assert main(["base", "build", "--suite", "syn6", "--profile", "tiny"]) == 0
    out = capsys.readouterr().out
    built = out.split("built θ0 ")[1].split()[0]
    shipped = basemodel.shipped_for(tiny_suite)[1]["sha256"]
    verdict = "equal: this machine rebuilds" if built == shipped else "different:"
    assert verdict in out and basemodel.cpu_description() in out
    # the variant: a manifest whose θ0 this machine does not build is reported as different
    name, entry = basemodel.shipped_for(tiny_suite)
    monkeypatch.setattr(basemodel, "shipped_manifest", lambda folder=None: {
        name: {**entry, "sha256": "0" * 64}})
    assert main(["base", "build", "--suite", "syn6", "--profile", "tiny"]) == 0
    assert "different: this machine does not rebuild the shipped bits" in capsys.readouterr().out
    assert main(["base", "build", "--suite", "real6"]) == 2


def test_kernel_setting_is_what_the_environment_pins():
    assert pinned(dict(PINNED)) and pinned({k: v.lower() for k, v in PINNED.items()})
    assert not pinned({**PINNED, "MKL_ENABLE_INSTRUCTIONS": "AVX512"}) and not pinned({})
    setting = kernel_setting()
    assert setting["capability"] == torch.backends.cpu.get_cpu_capability()
    assert setting["hardware"] == hardware_isa() in ("AVX512", "AVX2", "other")


def test_the_command_line_pins_the_kernels_unless_told_not_to(monkeypatch):
    import benchmark.kernels
    from benchmark.__main__ import cli

    started = []

    class Exec(Exception):
        pass

    def execve(path, args, env):
        started.append((path, args, env))
        raise Exec

    monkeypatch.setattr(os, "execve", execve)
    for name in PINNED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CDAP_PIN_KERNELS", "")  # unset for `wanted`; restored after the test
    monkeypatch.setattr(benchmark.kernels, "hardware_isa", lambda: "AVX512")
    for argv in (["base", "list"], ["--pin-kernels", "base", "list"]):  # the default, the flag
        monkeypatch.setattr(sys, "argv", ["benchmark", *argv])
        with pytest.raises(Exec):
            cli()
        path, args, env = started.pop()
        assert args == [sys.executable, "-m", "benchmark", "base", "list"]
        assert pinned(env) and not pinned()
    monkeypatch.setattr(sys, "argv", ["benchmark", "--no-pin-kernels", "base", "list"])
    assert cli() == 0 and not started  # runs here, unpinned
    assert os.environ["CDAP_PIN_KERNELS"] == "0"  # what a sweep's cells inherit
    assert not benchmark.kernels.wanted()
    monkeypatch.setenv("CDAP_PIN_KERNELS", "")
    monkeypatch.setattr(benchmark.kernels, "hardware_isa", lambda: "other")  # no AVX2
    monkeypatch.setattr(sys, "argv", ["benchmark", "base", "list"])
    assert cli() == 0 and not started
    monkeypatch.setenv("CDAP_PIN_KERNELS", "1")  # asked for: pinned whatever the CPU
    with pytest.raises(Exec):
        cli()
    assert pinned(started.pop()[2])
    for name, value in PINNED.items():  # already pinned: runs here, no new start
        monkeypatch.setenv(name, value)
    assert cli() == 0 and not started
    assert main(["--pin-kernels", "base", "list"]) == 0 and not started  # in-process: no exec


def test_the_variables_set_before_torch_starts_hold_aten_to_avx2():
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k not in PINNED}
    out = {}
    for pin in (False, True):
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              env={**env, **PINNED} if pin else env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[pin] = proc.stdout.strip()
    assert out[True] == "AVX2"
    assert out[False] == {"AVX512": "AVX512", "AVX2": "AVX2"}.get(hardware_isa(), out[False])


def test_records_without_base_name_or_kernels_load_and_old_tables_do_not_change(capsys):
    old = next((ROOT / "results" / "syn6" / "syn6-default" / "das").rglob("result.json"))
    record = load(old)
    assert record.base_name is None and record.kernels is None and record.base_fingerprint
    assert "base_name" not in json.loads(old.read_text())


def _tiny_row(tmp_path: Path) -> Path:
    assert main(["run", "--profile", "tiny", "--method", "ncl", "--seed", "2021",
                 "--out", str(tmp_path / "runs"), "--no-table"]) == 0
    return next((tmp_path / "runs").rglob("result.json"))


@pytest.mark.slow
def test_reproduce_a_row_made_here_matches_bit_for_bit_and_names_a_changed_cell(tmp_path,
                                                                               capsys):
    path = _tiny_row(tmp_path)
    made = load(path)
    assert made.base_name == "syn6-tiny" and made.kernels == kernel_setting()
    assert len(made.final_fingerprint) == 64
    data = json.loads(path.read_text())
    data["mf1"][1][0] += 1e-9  # the variant: one cell off in its last digits
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["reproduce", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NOT reproduced bit for bit" in out and "1 values differ" in out, out
    changed = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(changed) == 1 and changed[0].startswith("  mf1[1][0] (after"), out


def test_differences_name_every_changed_number_and_nothing_else():
    recorded = load(COMMITTED)
    assert differences(recorded, recorded) == []
    other = copy.deepcopy(recorded)
    other.dap_loss[2][-1] = float("nan")
    other.acc[2] = other.acc[2][:-1]
    other.final_fingerprint = "0" * 64
    lines = differences(recorded, other)
    assert [line.split(" ")[0].rstrip(":") for line in lines] == [
        "acc[2][2]", f"dap_loss[2][{len(other.dap_loss[2]) - 1}]", "final_fingerprint"], lines
    other = copy.deepcopy(recorded)
    other.mf1[0][0] = round(other.mf1[0][0] + 1e-4, 4)  # a change in the last recorded digit
    assert [line.split(" ")[0] for line in differences(recorded, other)] == ["mf1[0][0]"]
    recorded.final_fingerprint = None  # results made before it was recorded: not compared
    assert differences(recorded, other)[-1].startswith("mf1[0][0]")
    # nor are collapsed flags a file does not record (None), while a recorded flag is
    other = load(COMMITTED)
    recorded = load(COMMITTED)
    recorded.collapsed = [[None] * len(row) for row in recorded.collapsed]
    other.collapsed[2][1] = not other.collapsed[2][1]
    assert differences(recorded, other) == []
    assert [line.split(" ")[0] for line in differences(load(COMMITTED), other)] == [
        "collapsed[2][1]"]


def test_reproduce_refuses_a_result_from_another_theta0(tmp_path, capsys):
    data = json.loads(COMMITTED.read_text())
    data["base_fingerprint"] = "ca5e9c4d" + "0" * 56
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    assert main(["reproduce", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ca5e9c4d0000" in err and "another experiment" in err


def test_reproduce_refuses_to_overwrite_the_result_it_reruns(tmp_path, capsys):
    runs = tmp_path / "runs"
    path = runs / "syn6-tiny" / "ncl" / "order0" / "seed2021" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(COMMITTED.read_text())
    assert main(["reproduce", str(path), "--out", str(runs)]) == 2
    assert "would overwrite" in capsys.readouterr().err
    assert path.read_text() == COMMITTED.read_text()


@pytest.mark.slow
def test_reproduce_the_committed_tiny_row(capsys):
    """What CI runs. The row was made with the command line's default, kernels pinned to AVX2,
    on an AVX512 AMD EPYC. On a CPU of its kernel class (the same CPU description, which names
    the dispatched set and the model, and the same pinning; pinned, AVX2 and AVX512 EPYCs are
    one class) the rerun must match bit for bit. Elsewhere the last bits of DAP-training and
    fine-tuning may differ with the kernels, so the rerun must finish and report its
    differences cell by cell (bit-for-bit reproduction on any machine is checked by the row made
    and rerun here, in the test above)."""
    recorded = load(COMMITTED)
    code = main(["reproduce", str(COMMITTED)])
    out = capsys.readouterr().out
    now = kernel_setting()
    same_class = recorded.cpu == basemodel.cpu_description() and all(
        recorded.kernels[key] == now[key] for key in ("pinned", "env", "capability"))
    if same_class:
        assert code == 0 and "reproduced bit for bit" in out, out
    else:
        assert code in (0, 1) and "bit for bit" in out, out


def test_a_recorded_config_gets_the_values_its_code_used_for_options_added_since():
    """Results made before `importance_batch_size` existed took importance batches of the DAP
    batch size: reproducing one must not take the class default (100) instead."""
    from benchmark.config import RunConfig, recorded_config, validate
    from methods import build_method

    old = {"method": "das", "dap_batch_size": 64}
    assert validate(RunConfig, recorded_config(old), "r").importance_batch_size == 64
    assert validate(RunConfig, old, "r").importance_batch_size == 100  # what went wrong
    new = {**old, "importance_batch_size": 32}
    assert recorded_config(new) == new
    # a record made before the reference forms became the defaults ran the earlier ones
    for method, option, value in (("hat", "form", "binary"), ("derpp", "replay_batches", "two"),
                                  ("adapter-one", "ft_train_lm", True)):
        earlier = recorded_config({"method": method, "method_args": {}}, earlier=True)
        args = build_method(method, earlier["method_args"]).args
        assert getattr(args, option) == value
        assert getattr(build_method(method, {}).args, option) != value  # today's default
    given = {"method": "hat", "method_args": {"form": "paper"}}
    assert recorded_config(given, earlier=True)["method_args"]["form"] == "paper"
