"""Which dtype a trainer computes in (`optim.dtype`): unset, auto or explicit, on hardware that does
or does not multiply bfloat16 natively (a CPU without AVX512-BF16 emulates it ~100x slower)."""

from __future__ import annotations

import pytest
import torch
from stillroom.actors.models import loading
from stillroom.actors.models.loading import training_dtype


@pytest.mark.parametrize(
    ("asked", "native", "cuda", "expected", "warns"),
    [
        ("", False, False, "float32", False),
        ("", True, False, "float32", False),  # unset keeps a CPU in float32 (the tested numerics)
        ("", True, True, "bfloat16", False),
        ("auto", True, False, "bfloat16", False),  # an AVX512-BF16 CPU
        ("auto", False, False, "float32", False),  # a CPU that would emulate it
        ("auto", False, True, "float32", False),  # an old GPU
        ("bfloat16", False, False, "bfloat16", True),  # honoured, but the user is told
        ("bfloat16", True, False, "bfloat16", False),
        ("float32", True, True, "float32", False),
    ],
)
def test_training_dtype_follows_the_hardware(monkeypatch, asked, native, cuda, expected, warns):
    monkeypatch.setattr(loading, "native_bfloat16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dtype, warning = training_dtype(asked)
    assert dtype == expected
    assert bool(warning) == warns
    if warns:
        assert "optim.dtype" in warning and "float32" in warning


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU flags decide only without a GPU")
def test_native_bfloat16_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    assert loading.native_bfloat16() == (" avx512_bf16" in flags or " amx_bf16" in flags)
    assert loading.inference_dtype() == ("bfloat16" if loading.native_bfloat16() else "float32")
