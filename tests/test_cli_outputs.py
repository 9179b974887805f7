"""Commands that write never replace a directory of the user's: `train-router --out`, `export-mixture
--out`, `bench --out` are checked before any work (a non-empty directory that holds something else is
refused, `--overwrite` replaces only a router or an adapter, a symlink is written through, a dangling
one refused); hostile JSONL and router configs end in one line. Reuses test_cli's tiny artifacts."""

# ruff: noqa: F811  (tests take the imported `art` fixture as a parameter of the same name)
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_cli import _adapter_args, _assert_one_line_error, art  # noqa: F401  (the `art` fixture)

from dlp_lora.cli import main
from dlp_lora.router import Router


@pytest.fixture
def no_training(monkeypatch):
    """Any training from here on fails the test: the refusals must come before it."""
    def never(*args, **kwargs):
        raise AssertionError("the router was trained before --out was checked")

    monkeypatch.setattr(Router, "fit", classmethod(never))


def _train(art, out, *extra, data=None):
    return ["train-router", "--data", str(data or art["data"]), "--tokenizer", str(art["model"]),
            "--out", str(out), "--epochs", "1", *extra]


def _project(tmp_path):
    project = tmp_path / "p"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("x\n")
    return project


def test_train_router_refuses_a_directory_of_other_files(art, capsys, tmp_path, no_training):
    project = _project(tmp_path)
    for extra in ((), ("--overwrite",)):
        code = main(_train(art, project, *extra))
        _assert_one_line_error(capsys, code, "--out", "not empty", "does not hold a router")
        assert (project / "src" / "main.py").read_text() == "x\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_overwrite_replaces_only_a_router(art, capsys, tmp_path):
    out = tmp_path / "router"
    shutil.copytree(art["router"], out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Router, "fit", classmethod(lambda *a, **k: pytest.fail("trained before the check")))
        code = main(_train(art, out))
        _assert_one_line_error(capsys, code, "--out", "already holds a router", "--overwrite")
    assert main(_train(art, out, "--overwrite")) == 0
    assert sorted(Router.load(out).label_names) == sorted(art["adapters"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_an_out_symlink_is_written_through(art, capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert main(_train(art, link)) == 0
    capsys.readouterr()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "router_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no stray .link.*.old


def test_a_dangling_out_symlink_is_refused_before_training(art, capsys, tmp_path, no_training):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    _assert_one_line_error(capsys, main(_train(art, link)), "--out", "symlink", "does not exist")


def test_out_dot_is_refused_before_training(art, capsys, tmp_path, monkeypatch, no_training):
    shutil.copytree(art["router"], tmp_path / "here")
    monkeypatch.chdir(tmp_path / "here")
    _assert_one_line_error(capsys, main(_train(art, ".", "--overwrite")), "--out", "current directory")
    assert (tmp_path / "here" / "router_config.json").is_file()


@pytest.mark.parametrize(("line", "needle"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"text": "caf\\ud800", "task": "reverse"}', "lone surrogate"),
    ('{"text": "abc", "task": "\\udfff"}', "lone surrogate"),
    ('{"text": ' + "9" * 5000 + ', "task": "reverse"}', "not valid JSON"),
])
def test_hostile_jsonl_lines_are_one_line_naming_the_line(art, tmp_path, line, needle):
    data = tmp_path / "bad.jsonl"
    lines = art["data"].read_text().splitlines(keepends=True)
    data.write_text(lines[0] + line + "\n" + "".join(lines[1:]))
    argv = [sys.executable, "-m", "dlp_lora.cli", *_train(art, tmp_path / "router", data=data)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{data} line 2" in proc.stderr and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "router").exists()


def test_train_router_help_describes_epochs_and_seed():
    argv = [sys.executable, "-m", "dlp_lora.cli", "train-router", "--help"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag, default in (("--epochs EPOCHS", "(default 6)"), ("--seed SEED", "(default 0)")):
        after = text[text.rindex(flag) + len(flag):]
        assert default in after[:160], after[:160]
    assert "--overwrite" in text


# ---- export-mixture and bench --------------------------------------------------------------------------


def _export(art, out, *extra):
    return ["export-mixture", "--adapters", *_adapter_args(art["adapters"]), "--mixture", "reverse=1",
            "--out", str(out), *extra]


def test_export_mixture_names_overwrite_and_never_replaces_other_files(art, capsys, tmp_path):
    project = _project(tmp_path)
    code = main(_export(art, project, "--overwrite"))
    _assert_one_line_error(capsys, code, "--out", "does not hold an adapter")
    assert (project / "src" / "main.py").read_text() == "x\n"
    out = tmp_path / "adapter"
    assert main(_export(art, out)) == 0
    capsys.readouterr()
    code = main(_export(art, out))
    _assert_one_line_error(capsys, code, "--out", "already holds an adapter", "--overwrite")
    assert main(_export(art, out, "--overwrite")) == 0


def test_export_mixture_writes_through_a_symlink(art, capsys, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(_export(art, tmp_path / "link")) == 0
    assert (tmp_path / "link").is_symlink() and (real / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_bench_refuses_a_dangling_out_symlink_before_the_run(capsys, tmp_path, monkeypatch):
    from dlp_lora.bench import harness

    monkeypatch.setattr(harness, "build_base_model", lambda *a, **k: pytest.fail("ran before the check"))
    (tmp_path / "result.json").symlink_to(tmp_path / "gone" / "result.json")
    code = main(["bench", "--model", "tiny", "--out", str(tmp_path / "result.json")])
    _assert_one_line_error(capsys, code, "--out", "symlink", "does not exist")


def test_a_router_config_asking_for_a_million_layers_is_refused_before_building(art, capsys, tmp_path):
    bad = tmp_path / "router"
    shutil.copytree(art["router"], bad)
    config = json.loads((bad / "router_config.json").read_text())
    config["config"]["num_layers"] = 1_000_000
    (bad / "router_config.json").write_text(json.dumps(config))
    code = main(["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(art["adapters"]),
                 "--router", str(bad), "--prompt", "reverse ab=", "--max-new-tokens", "1"])
    _assert_one_line_error(capsys, code, str(bad), "num_layers must be an integer in [1, 64]")


def test_demo_rebuild_base_never_replaces_a_directory_of_other_files(tmp_path):
    project = _project(tmp_path)
    argv = [sys.executable, "-m", "dlp_lora.demo", "--rebuild-base", str(project)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "--rebuild-base" in proc.stderr and "does not hold a demo base" in proc.stderr, proc.stderr
    assert (project / "src" / "main.py").read_text() == "x\n"
