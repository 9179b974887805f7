"""Where a result file's numbers came from: machine, software versions and load.

Every committed result (``dlp-lora bench``, ``make demo``) records these, so a table generated from
it (benchmarks/make_readme_tables.py) can say which machine and versions produced it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path

import torch


def machine_info(device: str = "cpu") -> dict:
    """CPU model, logical cores, torch threads and platform (plus the GPU's name for a CUDA device)."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), sm_count=props.multi_processor_count,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / (1 << 30), 1))
    return info


def versions() -> dict:
    """Python, torch, CUDA, Triton, transformers, peft and dlp_lora versions, and the usable op backends."""
    import peft
    import transformers

    from .. import __version__, ops

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "transformers": transformers.__version__, "peft": peft.__version__,
            "dlp_lora": __version__, "op_backend": ops.resolve_backend(torch.device("cpu")),
            "backends": ops.available_backends()}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def timestamp() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
