"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over one LLMEngine.

`config` (ServerConfig) is light to import; `serve.Server` pulls in FastAPI and uvicorn.
Nothing in kvforge imports this package except the CLI.
"""

from kvforge.server.config import ServerConfig

__all__ = ["ServerConfig"]
