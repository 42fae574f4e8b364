"""Shared fixtures: the embedded model loaded once per session, for kvforge and for HF transformers."""

from __future__ import annotations

import pytest
import torch

from kvforge import LLM
from kvforge.model.loader import resolve_model_path

MODEL = "smollm2-135m"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The three laws of thermodynamics are",
]


def make_llm(**kwargs) -> LLM:
    kwargs.setdefault("kv_cache_memory", 64 << 20)
    return LLM(MODEL, **kwargs)


@pytest.fixture(scope="session")
def llm() -> LLM:
    return make_llm()


@pytest.fixture(scope="session")
def hf_model():
    transformers = pytest.importorskip("transformers")
    path = resolve_model_path(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval()
