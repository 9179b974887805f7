"""What users install: a wheel built from this checkout, installed by pip into a scratch venv.

Editable installs import from the checkout and hide a package left out of the wheel. Here the
wheel is built (``pip wheel --no-build-isolation --no-deps``, the compiled extension included),
installed with pip into a venv under tmp_path, and used from outside the repository:
every module of every subpackage imports, the ``cpp`` backend is available, ``dlp-lora serve
--help`` runs, and a tiny model is patched and generates.

Offline and fast: the scratch venv sees this venv's already-installed dependencies through a
``.pth`` line (paths a ``.pth`` adds are not site directories, so this venv's editable-install hook
is not run), and the test asserts that ``dlp_lora`` really comes from the scratch venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# Run inside the scratch venv, from tmp_path: imports all of dlp_lora, the backends, a patched generate.
SMOKE = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    import torch
    import dlp_lora
    from dlp_lora import LoRABank, ops, patch_model, unpatch_model, use_mixture

    modules = []
    for info in pkgutil.walk_packages(dlp_lora.__path__, "dlp_lora."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # `python -m` entry points run when imported
            importlib.import_module(info.name)
            modules.append(info.name)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    base = LlamaForCausalLM(config).eval()
    names = [n for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    adapters = {task: {n: (torch.randn(4, 32), torch.randn(32, 4), 2.0) for n in names}
                for task in ("a", "b")}
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        before = base(ids).logits
        model = patch_model(base, LoRABank.from_adapters(adapters))
        with use_mixture(model, {"a": 0.7, "b": -0.3}) as log:
            mixed = model(ids).logits
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            records = [(r.adapters, r.reason) for r in log]
        unpatch_model(model)
        after = model(ids).logits
    print(json.dumps({
        "file": dlp_lora.__file__,
        "modules": modules,
        "backends": ops.available_backends("cpu"),
        "generated": out.shape[1] - ids.shape[1],
        "delta": float((mixed - before).abs().max()),
        "unpatched_equal": bool(torch.equal(after, before)),
        "records": records,
    }))
""")


def _run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # The build reuses build/temp* (the compiled objects: seconds instead of a minute), but nothing
    # that lists files: the staged package in build/lib* and build/bdist* would still hold a file
    # deleted from the checkout, and an old *.egg-info/SOURCES.txt adds the files of packages that
    # setup.py leaves out as package data (hiding exactly the bug this test exists for).
    build = ROOT / "build"
    for stale in [*build.glob("lib.*"), *build.glob("bdist.*"), *ROOT.glob("*.egg-info")]:
        shutil.rmtree(stale)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(out),
          str(ROOT)], cwd=out, timeout=900)
    (path,) = out.glob("dlp_lora-*.whl")
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, wheel) -> Path:
    """A venv outside the repository with the wheel installed by pip; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("scratch")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = Path(subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    # The dependencies (torch, transformers, ray, ...) from this venv, after the scratch venv's own.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=root, timeout=300)
    return python.parent


def test_the_wheel_holds_every_package_and_the_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "dlp_lora").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"]
    sources += [f"dlp_lora/triton_kernels/{p.name}" for p in (ROOT / "triton_kernels").glob("*.py")]
    missing = sorted(set(sources) - names)
    assert not missing, missing
    assert any(n.startswith("dlp_lora/_C") and n.endswith(".so") for n in names), "no compiled extension"
    assert "dlp_lora/demo/base-model/model.safetensors" in names


def test_installed_wheel_imports_patches_and_generates(scratch, tmp_path):
    import json

    result = _run([str(scratch / "python"), "-c", SMOKE], cwd=tmp_path, timeout=600)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).is_relative_to(scratch.parent), got["file"]  # not the checkout
    for package in ("dlp_lora.serving", "dlp_lora.serving.app", "dlp_lora.ops", "dlp_lora.router",
                    "dlp_lora.triton_kernels", "dlp_lora.bench", "dlp_lora.demo"):
        assert package in got["modules"], package
    assert "cpp" in got["backends"]
    assert got["generated"] == 3 and got["delta"] > 1e-3 and got["unpatched_equal"]
    assert got["records"] == [[["a", "b"], "mixture"]]


def test_installed_command_line_runs(scratch, tmp_path):
    result = _run([str(scratch / "dlp-lora"), "serve", "--help"], cwd=tmp_path, timeout=120)
    assert "--model" in result.stdout and "--adapters" in result.stdout
