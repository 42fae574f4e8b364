"""The engine room: scheduler, LLMEngine and the offline LLM API."""

from kvforge.cache import KVEvent, NoFreeBlocksError
from kvforge.engine.engine import EngineStats, KVRoom, LLMEngine, StepError, blocks_for, model_info
from kvforge.engine.llm import LLM
from kvforge.model.tokenizer import Tokenizer, compile_chat_template
from kvforge.types import PreparedRequest

__all__ = ["LLM", "EngineStats", "KVEvent", "KVRoom", "LLMEngine", "NoFreeBlocksError", "PreparedRequest", "StepError",
           "Tokenizer", "blocks_for", "compile_chat_template", "model_info"]
