"""The demo's shipped base model: where it lies, the sha256 of its files, and how to build it again.

dlp_lora/demo/base-model/ holds a pretrained char-level Llama (model.safetensors, config.json, tokenizer
files: `save_pretrained` output) and sha256.json, which records each file's sha256, the BaseRecipe
that trained it and the library versions it was trained with. The demo starts from it, as a user
starts from a pretrained model, and checks every file against sha256.json before using it.

`python -m dlp_lora.demo --rebuild-base [DIR]` pretrains it again (~5 min on one core) and compares
the new files' sha256 with the shipped ones: with the recorded versions they are equal byte for byte
(one torch thread, fixed seeds; see build.reproducible). config.json and generation_config.json name
the transformers version, so under another version those two differ even when the weights do not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

# package data, not a package: a name that is no Python identifier cannot be imported
BASE_DIR = Path(__file__).resolve().with_name("base-model")
MANIFEST = "sha256.json"
REBUILD = "python -m dlp_lora.demo --rebuild-base"


class BaseModelError(ValueError):
    """The shipped base is missing or does not match its recorded sha256 (a one-line message)."""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    import safetensors
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


def read_manifest(directory: Path | None = None) -> dict:
    """sha256.json of `directory` (default: the shipped base)."""
    path = Path(directory or BASE_DIR) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise BaseModelError(f"{path}: unreadable sha256 manifest of the demo base ({e}); "
                             f"reinstall dlp-lora or run {REBUILD}") from None
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise BaseModelError(f"{path}: lists no model.safetensors; reinstall dlp-lora or run {REBUILD}")
    return manifest


def verified_base(directory: Path | None = None) -> Path:
    """`directory` (default: the shipped base) once every file its sha256.json lists is there with that
    sha256; else BaseModelError naming the first file that is missing or differs."""
    directory = Path(directory or BASE_DIR)
    for name, expected in read_manifest(directory)["files"].items():
        path = directory / name
        if not path.is_file():
            raise BaseModelError(f"{path}: missing from the demo base; reinstall dlp-lora or run {REBUILD}")
        actual = sha256(path)
        if actual != expected:
            raise BaseModelError(f"{path}: sha256 {actual[:16]}... differs from {expected[:16]}... recorded "
                                 f"in {directory / MANIFEST}; reinstall dlp-lora or run {REBUILD}")
    return directory


def write_manifest(directory: Path, recipe, note: str) -> dict:
    """Record the sha256 of every file in `directory`, the recipe and the versions in sha256.json."""
    files = {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"files": files, "recipe": dataclasses.asdict(recipe), "versions": _versions(), "note": note}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def build_base(out_dir: Path, recipe, log: Callable[[str], None] = print) -> dict:
    """Pretrain a base from `recipe` (a build.BaseRecipe) into `out_dir`, replacing it only once it is
    complete, with its sha256.json; return the manifest."""
    from .build import pretrain_base

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    note = pretrain_base(tmp, recipe, log=log)
    manifest = write_manifest(tmp, recipe, note)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log(f"base model written to {out_dir}: {note}")
    return manifest


def rebuild(out_dir: Path | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Pretrain the base again from build.BaseRecipe() into `out_dir` (default: the shipped base);
    return the names of the files whose sha256 differs from the shipped manifest's (empty: the same
    bytes)."""
    from .build import BaseRecipe

    try:
        shipped = read_manifest()
    except BaseModelError:
        shipped = {"files": {}, "versions": {}}
    manifest = build_base(Path(out_dir or BASE_DIR), BaseRecipe(), log=log)
    names = sorted(set(manifest["files"]) | set(shipped["files"]))
    differ = [n for n in names if manifest["files"].get(n) != shipped["files"].get(n)]
    for name in names:
        log(f"  {manifest['files'].get(name, 'missing')[:16]}  {name}"
            f"{'  (differs from the shipped file)' if name in differ else ''}")
    if not shipped["files"]:
        log("  (no shipped sha256.json to compare with)")
    elif differ and shipped["versions"] != manifest["versions"]:
        log(f"  shipped with {shipped['versions']}, rebuilt with {manifest['versions']}")
    return differ
