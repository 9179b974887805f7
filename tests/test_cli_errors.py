"""`dlp-lora` on damaged files, impossible devices and failing writes: one stderr line naming the file
or the argument, exit status 2, nothing written; `--debug` (before or after the command) shows the
traceback instead. Reuses test_cli's tiny artifacts (model, adapters, task JSONL, routers)."""

# ruff: noqa: F811  (tests take the imported `art` fixture as a parameter of the same name)
from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch
from test_cli import _adapter_args, _assert_one_line_error, art  # noqa: F401  (the `art` fixture)

from dlp_lora import cli
from dlp_lora.cli import CLIError, main


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _generate(art, *extra):
    return ["generate", "--model", str(art["model"]), "--adapters", *_adapter_args(art["adapters"]),
            "--prompt", "reverse ab=", "--max-new-tokens", "2", *extra]


def _train(art, out, data=None):
    return ["train-router", "--data", str(data or art["data"]), "--tokenizer", str(art["model"]),
            "--out", str(out), "--epochs", "1"]


# ---- damaged files ---------------------------------------------------------------------------------


def test_truncated_adapter_weights(art, capsys, tmp_path):
    bad = _copy(art["adapters"]["reverse"], tmp_path / "reverse")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    code = main(["inspect", "--adapters", f"reverse={bad}"])
    _assert_one_line_error(capsys, code, "'reverse'", str(weights))


def test_adapter_config_holding_a_list(art, capsys, tmp_path):
    bad = _copy(art["adapters"]["reverse"], tmp_path / "reverse")
    (bad / "adapter_config.json").write_text("[]")
    code = main(["inspect", "--adapters", f"reverse={bad}"])
    _assert_one_line_error(capsys, code, "'reverse'", str(bad / "adapter_config.json"), "JSON object")


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "router.safetensors").write_bytes((d / "router.safetensors").read_bytes()[:64]),
     "router.safetensors"),
    (lambda d: (d / "router_config.json").write_text(
        (d / "router_config.json").read_text().replace('"format_version": 1', '"format_version": "1"')),
     "format_version"),
])
def test_damaged_router(art, capsys, tmp_path, damage, needle):
    bad = _copy(art["router"], tmp_path / "router")
    damage(bad)
    code = main(_generate(art, "--router", str(bad)))
    _assert_one_line_error(capsys, code, needle, str(bad))


def test_jsonl_with_bad_utf8_names_file_and_line(art, capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    lines = art["data"].read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(lines[:2]) + b'{"text": "caf\xe9", "task": "reverse"}\n' + b"".join(lines[2:]))
    code = main(_train(art, tmp_path / "never", data))
    _assert_one_line_error(capsys, code, str(data), "line 3", "UTF-8")
    assert not (tmp_path / "never").exists()


# ---- devices ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, needle", [
    ("bogus", "--device"),
    pytest.param("cuda", "CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    pytest.param("cuda:7", "cuda:7", marks=pytest.mark.skipif(torch.cuda.device_count() > 7,
                                                               reason="has 8 GPUs")),
    ("meta", "cpu or cuda"),
])
def test_impossible_device(art, capsys, device, needle, monkeypatch):
    loaded = []
    monkeypatch.setattr("dlp_lora.bank.LoRABank.from_peft", lambda *a, **k: loaded.append(a))
    code = main(_generate(art, "--mixture", "reverse=1", "--device", device))
    _assert_one_line_error(capsys, code, "--device", needle)
    assert not loaded, "the device is checked before anything is loaded"


# ---- failing writes ----------------------------------------------------------------------------------


def _assert_error_after_training(capsys, code, *needles):
    """Training draws its progress bar on stderr; the error is the one line after it."""
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dlp-lora train-router: error: "), err
    for needle in needles:
        assert needle in last, last


@pytest.mark.parametrize("writer", ["save_file", "write_text"])
def test_full_disk_while_saving_the_router(art, capsys, tmp_path, monkeypatch, writer):
    out = tmp_path / "router"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if writer == "save_file":
        monkeypatch.setattr("dlp_lora.router.model.save_file", full)
    else:
        monkeypatch.setattr("pathlib.Path.write_text", full)
    _assert_error_after_training(capsys, main(_train(art, out)), "--out", str(out), "No space left")
    assert list(tmp_path.iterdir()) == []  # no router, no temporary directory


def test_read_only_out(art, capsys, tmp_path, monkeypatch):
    """Root ignores permissions, so the file system's refusal is simulated: first at the up-front
    check (nothing trained), then at the save itself (after training: still one line, nothing left)."""
    out = tmp_path / "ro" / "router"
    monkeypatch.setattr("dlp_lora._atomic.os.access", lambda path, mode: False)
    _assert_one_line_error(capsys, main(_train(art, out)), "--out", "not writable", str(tmp_path))
    monkeypatch.undo()

    def read_only(path, mode=0o777):
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr("dlp_lora._atomic.os.mkdir", read_only)
    _assert_error_after_training(capsys, main(_train(art, out)), "--out", str(out), "Read-only")
    assert not out.exists()


def test_out_under_a_file(art, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code = main(_train(art, tmp_path / "file" / "router"))
    _assert_one_line_error(capsys, code, "--out", "not a directory")


# ---- --debug ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback(where):
    args = ["inspect", "--adapters", "x=/nonexistent/dir"]
    argv = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(CLIError, match="directory not found"):
        main(argv)


def test_without_debug_the_error_is_one_line(capsys):
    _assert_one_line_error(capsys, main(["inspect", "--adapters", "x=/nonexistent/dir"]), "not found")


def test_every_command_takes_debug():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert any("--debug" in a.option_strings for a in command._actions), name


def test_jsonl_reader_reports_json(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a", "task": "x"}) + "\n" + '{"text": 1}\n')
    with pytest.raises(CLIError, match="line 2"):
        cli.read_task_jsonl(data)


def test_truncated_model_weights(art, capsys, tmp_path):
    model = _copy(art["model"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    code = main(["generate", "--model", str(model), "--adapters", *_adapter_args(art["adapters"]),
                 "--mixture", "reverse=1", "--prompt", "reverse ab="])
    _assert_one_line_error(capsys, code, "--model", str(model))


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_bench_output_checked_before_the_run(capsys, tmp_path, monkeypatch, flag):
    """A bench output that cannot be written fails at once, naming the flag, before any model is built."""
    from dlp_lora.bench import harness

    def never(*args, **kwargs):
        raise AssertionError("the benchmark started before its output path was checked")

    monkeypatch.setattr(harness, "build_base_model", never)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["bench", "--model", "tiny", flag, str(blocker / "result.json")])
    _assert_one_line_error(capsys, code, flag)
    code = main(["bench", "--model", "tiny", flag, str(tmp_path)])
    _assert_one_line_error(capsys, code, "is a directory")
