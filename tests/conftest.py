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
