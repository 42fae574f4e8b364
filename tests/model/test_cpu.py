"""The CPU allocator settings (kvforge/model/cpu.py)."""

from __future__ import annotations

import gc
import platform
import resource

import pytest
import torch

from kvforge.model.cpu import tune_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_tuned_allocator_reuses_activation_memory_instead_of_faulting_in_fresh_pages():
    assert tune_allocator() is True
    assert tune_allocator() is True  # once per process; a second call changes nothing
    x = torch.randn(2048, 576)
    gc.collect()  # what earlier tests left is freed now, not between the measured ops
    gc.disable()
    try:
        for _ in range(3):  # warm: the heap grows to what one op needs
            (x * 2).sum()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            (x * 2).sum()  # a 4.7 MB temporary each time
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        gc.enable()
    assert faults < 20 * (x.numel() * 4 // 4096) // 10  # untuned: every temporary faults in all its pages
