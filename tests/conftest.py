"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported; on a machine
without CUDA the Triton kernels can only run in the interpreter, so turn it on here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Shared by the routing tests (test_generation) and the compile tests (test_compile).
@pytest.fixture(scope="module")
def tok():
    """The word-level tokenizer of tests/peft_fixtures.py."""
    from peft_fixtures import word_tokenizer

    return word_tokenizer()


@pytest.fixture(scope="module")
def task_adapters(tmp_path_factory):
    """A tiny Llama and one real PEFT adapter per task: (base model, {task: adapter directory})."""
    from peft_fixtures import TASKS, make_adapter, tiny_model

    base = tiny_model("llama", seed=7)
    root = tmp_path_factory.mktemp("task_adapters")
    return base, {t: make_adapter(base, root / t, seed=70 + i) for i, t in enumerate(TASKS)}


@pytest.fixture(scope="session")
def ray_serve():
    """One local Ray cluster (4 logical CPUs) with Serve's HTTP proxy on 127.0.0.1, for every serving test
    module of the session (each deploys and deletes its own applications): {"port", "address"}."""
    ray = pytest.importorskip("ray", reason="needs the serve extra: pip install 'dlp-lora[serve]'")
    from ray import serve
    from serving_fixtures import free_port

    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield {"port": port, "address": ray.get_runtime_context().gcs_address}
    finally:
        serve.shutdown()
        ray.shutdown()
