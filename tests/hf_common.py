"""What the Hugging Face integration tests share (test_hf, test_hf_kinds, test_htc_model, test_htc_train):
the star_attention backend they run on. Importing ``star_backend`` into a test module activates it there."""

from __future__ import annotations

import pytest
import torch

import htc_kernels.hf as hkhf


def cpu_kernel_available() -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("htc::star_attention", "CPU")
    except RuntimeError:
        return False


# The C++ kernel once registered ("auto" selects it); without the extension the same integration code
# runs on the "reference" backend (auto would pick a cpu op with no kernel).
BACKEND = "auto" if cpu_kernel_available() else "reference"


@pytest.fixture(autouse=True)
def star_backend(monkeypatch):
    monkeypatch.setattr(hkhf, "DEFAULT_BACKEND", BACKEND)
