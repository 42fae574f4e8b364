"""kvforge: a paged KV-cache manager and Llama-family inference engine."""

from kvforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvforge.engine import LLM, LLMEngine
from kvforge.types import CompletionOutput, InvalidRequestError, OutputKind, RequestOutput, SamplingParams

__all__ = [
    "LLM",
    "CacheConfig",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "ModelConfig",
    "OutputKind",
    "RequestOutput",
    "SamplingParams",
    "SchedulerConfig",
]
__version__ = "0.1.0"
