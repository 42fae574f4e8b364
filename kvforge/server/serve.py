"""Server: one engine, its engine loop, its metrics and the HTTP app, run by uvicorn.

`Server.run()` serves in the foreground until interrupted (`kvforge serve`); `start()` / `stop()`
serve from a background thread (tests, benchmarks), on a free port when `port` is 0.
"""

from __future__ import annotations

import concurrent.futures
import gc
import socket
import threading
import time
from typing import Any

import uvicorn

from kvforge.config import EngineConfig
from kvforge.engine import LLMEngine
from kvforge.metrics import ServerMetrics
from kvforge.server.app import build_app
from kvforge.server.config import ServerConfig
from kvforge.server.engine_loop import EngineLoop


class Server:
    """Serves `engine` over HTTP. The server owns the engine while it runs: nothing else may call
    it until `stop()` returns (use `call()` to run something on the engine loop meanwhile)."""

    def __init__(self, engine: LLMEngine, config: ServerConfig | None = None):
        self.engine, self.config = engine, config or ServerConfig()
        self.model_name = self.config.served_model_name or engine.config.model
        self.created = int(time.time())
        self.metrics = ServerMetrics(chunk_budget_blocks=engine.cache.chunk_budget)
        self.loop = EngineLoop(engine, self.config, self.metrics)
        # Tokenizing and chat templating run here, off the event loop and the engine loop.
        self.workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvforge-tokenize")
        self.app = build_app(self)
        self.port = self.config.port
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, engine_config: EngineConfig, config: ServerConfig) -> Server:
        return cls(LLMEngine(engine_config), config)

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}"

    def _uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(self.app, host=self.config.host, port=self.port, log_level=self.config.log_level,
                              lifespan="off", timeout_graceful_shutdown=5)

    def run(self) -> None:
        """Serve in the foreground until SIGINT (returns) or SIGTERM (uvicorn re-raises it once its
        connections are closed, which ends the process); then stop the engine loop. The heap built
        so far (imports, model, arena, CUDA graphs) is first frozen out of the garbage collector,
        which would otherwise walk it again at every full collection while serving, stalling every
        request in flight (a full collection of ~1.4M objects paused a process on the GPU machine
        for 0.83 s)."""
        gc.collect()
        gc.freeze()
        self.loop.start()
        try:
            uvicorn.Server(self._uvicorn_config()).run()
        except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised the signal
            pass
        finally:
            self.loop.stop()
            self.workers.shutdown(wait=False, cancel_futures=True)

    def start(self, timeout: float = 30.0) -> Server:
        """Serve from a background thread; returns once the socket accepts connections."""
        family = socket.getaddrinfo(self.config.host, self.port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio then sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.port))
        self.port = sock.getsockname()[1]
        self.loop.start()
        self._uvicorn = uvicorn.Server(self._uvicorn_config())
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]},
                                        name="kvforge-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """End every unfinished request (its client gets an error), stop the engine loop and the
        HTTP server. Idempotent."""
        self.loop.stop()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.workers.shutdown(wait=False, cancel_futures=True)

    def call(self, fn, timeout: float = 30.0) -> Any:
        """Run `fn(engine)` on the engine loop between two steps and return its result (or raise)."""
        return self.loop.call(fn).result(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
