"""ServerConfig: how the HTTP server listens and what it does when the KV cache is full.

A frozen dataclass validated at construction, like the engine's configs; `kvforge serve` builds its
options from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

ON_FULL = ("reject", "wait", "shrink")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    """The OpenAI-compatible server's settings.

    `on_full` says what happens to a request the cache cannot take now (see
    `kvforge.server.admission` for the exact definition of "full"):
      - reject: answer 503 with a `Retry-After: retry_after` header;
      - wait:   queue it (by priority, then arrival) for up to `queue_timeout` seconds, then 503;
                more than `max_queue` queued requests: 429;
      - shrink: lower its max_tokens to what fits now (finish_reason "length"); 503 if not even one
                token fits.
    `served_model_name` is the id clients send as `model` (default: the engine's `model` option).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    on_full: str = "wait"
    queue_timeout: float = 30.0
    max_queue: int = 256
    retry_after: int = 1
    served_model_name: str | None = None
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must be an address to listen on, e.g. 127.0.0.1")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535] (0 = any free port), got {self.port!r}")
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {', '.join(ON_FULL)}, got {self.on_full!r}")
        if not isinstance(self.queue_timeout, (int, float)) or not self.queue_timeout > 0:
            raise ValueError(f"queue_timeout must be a number of seconds > 0, got {self.queue_timeout!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if isinstance(self.retry_after, bool) or not isinstance(self.retry_after, int) or self.retry_after < 0:
            raise ValueError(f"retry_after must be a whole number of seconds >= 0, got {self.retry_after!r}")
        if self.served_model_name is not None and not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string or None")
        if self.log_level not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
