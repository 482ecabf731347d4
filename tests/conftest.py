"""Shared fixtures. Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1),
which must be set before any kernel is defined, hence here, before the package is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers import DEVICE  # noqa: E402


@pytest.fixture
def device():
    return DEVICE
