"""ServerConfig: how the HTTP server listens and what it does when the KV cache is full.

A frozen dataclass validated at construction, like the engine's configs; `kvforge serve` builds its
options from these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from kvforge.engine import compile_chat_template

ADMISSION = ("need", "reserve")
ON_FULL = ("reject", "wait", "shrink")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass(frozen=True)
class ServerConfig:
    """The OpenAI-compatible server's settings.

    `admission` says when the cache can take a request (see `kvforge.server.admission`): "need"
    (default, as vLLM) admits it when its prompt fits now and preempts (recomputes) the
    lowest-priority, newest request when running requests run out of blocks; "reserve" admits it
    only when its worst case (prompt + max_tokens) fits, so it is never preempted.
    `on_full` says what happens to a request the cache cannot take now:
      - reject: answer 503 with a `Retry-After: retry_after` header;
      - wait:   queue it (by priority, then arrival) for up to `queue_timeout` seconds, then 503;
                more than `max_queue` queued requests: 429;
      - shrink: with reserve, lower its max_tokens to what fits now (finish_reason "length"); 503
                if not even one token fits; with need, nothing can shrink a prompt: 503.
    `served_model_name` is the id clients send as `model` (default: the engine's `model` option).
    `api_key`, when set, is required as `Authorization: Bearer <key>` on every route but /health,
    /version and /metrics (as vLLM); a request without it gets 401. `chat_template` overrides the
    model's chat template: a Jinja template, or the path of a file holding one (read and compiled
    here, so a bad one fails before the model loads; the field then holds the template itself).
    A request body over `max_body_bytes` gets 413. `engine_timeout` bounds how long a handler waits
    for the engine loop to answer a call (metrics, chunk listing and deletion) before a 503.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    admission: str = "need"
    on_full: str = "wait"
    queue_timeout: float = 30.0
    max_queue: int = 256
    retry_after: int = 1
    served_model_name: str | None = None
    log_level: str = "info"
    max_body_bytes: int = 4 << 20
    engine_timeout: float = 60.0
    api_key: str | None = field(default=None, repr=False)
    chat_template: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must be an address to listen on, e.g. 127.0.0.1")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535] (0 = any free port), got {self.port!r}")
        if self.admission not in ADMISSION:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION)}, got {self.admission!r}")
        if self.on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {', '.join(ON_FULL)}, got {self.on_full!r}")
        for name in ("queue_timeout", "engine_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if isinstance(self.retry_after, bool) or not isinstance(self.retry_after, int) or self.retry_after < 0:
            raise ValueError(f"retry_after must be a whole number of seconds >= 0, got {self.retry_after!r}")
        if self.served_model_name is not None and not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string or None")
        if isinstance(self.max_body_bytes, bool) or not isinstance(self.max_body_bytes, int) \
                or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        if self.log_level not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be a non-empty string or None (no key required)")
        if self.chat_template is not None:
            object.__setattr__(self, "chat_template", _load_chat_template(self.chat_template))


def _load_chat_template(value: str) -> str:
    """The template `value` names: the contents of the file at that path, else `value` itself when it
    looks like a template (holds '{' or a line break, as vLLM's rule); compiled to check it."""
    path = Path(value)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a name too long or with a NUL byte for the file system
        is_file = False
    if is_file:
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"chat_template: cannot read {str(path)!r}: {e}") from None
    elif not any(c in value for c in "{}\n"):
        raise ValueError(f"chat_template {value!r} is neither a file nor a Jinja template")
    if not value.strip():
        raise ValueError("chat_template is empty")
    try:
        compile_chat_template(value)
    except ValueError as e:
        raise ValueError(f"chat_template: {e}") from None
    return value
