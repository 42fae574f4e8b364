"""The engine room: scheduler, LLMEngine and the offline LLM API."""

from kvforge.engine.engine import EngineStats, LLMEngine, model_info
from kvforge.engine.llm import LLM

__all__ = ["LLM", "EngineStats", "LLMEngine", "model_info"]
