"""RedisTier: values in a Redis (or Valkey) server, through redis-py, optionally expiring after a TTL.

The module is named after its backend like host.py and disk.py; `import redis` below is absolute,
so it is the client package, never this file.

A dead server must never hang the engine: connecting gives up after `CONNECT_TIMEOUT_S`, a reply
after `SOCKET_TIMEOUT_S`, and a command is retried once, only on a connection error (a pooled
connection to a server that restarted). An unreachable server is not an error at construction:
construction connects to nothing, so the first operation faults (and `MeteredTier` turns faults
into misses). The server's configuration is never changed: at its maxmemory a refused write
raises redis' OutOfMemoryError, a "full" fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url as _redis_parse_url
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError, OutOfMemoryError
from redis.retry import Retry

from kvforge.cache.tiers.base import Tier, check_items, check_key, check_keys, check_value

CONNECT_TIMEOUT_S = 0.5
SOCKET_TIMEOUT_S = 5.0
URL_FORMS = "redis://host:port/db, rediss://host:port/db, unix:///path/to/redis.sock?db=N or valkey://host:port/db"
# scheme -> the scheme redis-py knows
_SCHEMES = {"redis": "redis", "rediss": "rediss", "unix": "unix", "valkey": "redis", "valkeys": "rediss"}
# query parameters a Redis tier URL may carry: ttl is ours, the rest redis-py's
_OPTIONS = ("ttl", "db", "username", "password", "socket_timeout", "socket_connect_timeout",
            "health_check_interval", "max_connections", "client_name", "protocol", "ssl_cert_reqs",
            "ssl_ca_certs", "ssl_check_hostname")


@dataclass(frozen=True)
class RedisURL:
    """A checked Redis tier URL: `client_url` for redis-py (no ttl), `ttl_s`, and `spec`, the URL
    as configured (ttl included) with any password redacted, fit for logs and metrics."""

    client_url: str
    ttl_s: int | None
    spec: str


def parse_redis_url(url: str, ttl_s: int | None = None) -> RedisURL:
    """Check `url` (see `URL_FORMS`; `?ttl=SECONDS` sets the TTL) without connecting. `ttl_s`, when
    given, is the TTL; giving a different one in the URL too is an error. Raises ValueError naming
    the problem: an unknown scheme or query parameter, no host, a bad port or db, a TTL that is not
    a positive integer."""
    if not isinstance(url, str):
        raise ValueError(f"a Redis URL must be a str, got {type(url).__name__}")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad Redis URL {url!r}: {e}; the forms are {URL_FORMS}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES or not url.strip()[len(scheme):].startswith("://"):
        raise ValueError(f"a Redis URL starts with one of {', '.join(s + '://' for s in _SCHEMES)}; got {url!r} "
                         f"(the forms are {URL_FORMS})")
    query = parse_qsl(parts.query, keep_blank_values=True)
    names = [name for name, _ in query]
    unknown = sorted(set(names) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"unknown query parameter(s) {', '.join(unknown)} in Redis URL {_redact(parts, query)!r}; "
                         f"known: {', '.join(_OPTIONS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"query parameter(s) {', '.join(repeated)} given twice in Redis URL {_redact(parts, query)!r}")
    options = dict(query)
    if ttl_s is not None:
        ttl_s = _check_ttl(ttl_s, "ttl_s")
    if "ttl" in options:
        url_ttl = _check_ttl(options.pop("ttl"), "the URL's ttl")
        if ttl_s is not None and url_ttl != ttl_s:
            raise ValueError(f"two TTLs for one Redis tier: ttl_s={ttl_s} and ?ttl={url_ttl} in the URL; give one")
        ttl_s = url_ttl
    spec_query = query if "ttl" in names or ttl_s is None else [*query, ("ttl", str(ttl_s))]
    spec = _redact(parts, spec_query)
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"a unix:// Redis URL names the socket file, e.g. unix:///run/redis.sock; got {spec!r}")
    else:
        if not parts.hostname:
            raise ValueError(f"Redis URL {spec!r} names no host; the forms are {URL_FORMS}")
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the database in Redis URL {spec!r} must be a number (redis://host:port/0), got {db!r}")
    if port == 0:
        raise ValueError(f"Redis URL {spec!r} has port 0")
    client_url = _unsplit(_SCHEMES[scheme], parts.netloc, parts.path, urlencode(options))
    try:
        _redis_parse_url(client_url)  # the typed parameters (db, timeouts...)
    except ValueError as e:
        raise ValueError(f"bad Redis URL {spec!r}: {e}") from None
    return RedisURL(client_url, ttl_s, spec)


def _check_ttl(ttl: object, what: str) -> int:
    if isinstance(ttl, str) and ttl.isdigit():
        ttl = int(ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
        raise ValueError(f"{what} must be a positive whole number of seconds, got {ttl!r}")
    return ttl


def _redact(parts, query: list[tuple[str, str]]) -> str:
    """The URL with its password (in the user info or the query) replaced by ***."""
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    query = [(name, "***" if name == "password" else value) for name, value in query]
    return _unsplit(parts.scheme, netloc, parts.path, urlencode(query, safe="*/"))


def _unsplit(scheme: str, netloc: str, path: str, query: str) -> str:
    """The URL of these parts, with "//" even when there is no host (unix:///path: urlunsplit drops it)."""
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")


class RedisTier(Tier):
    """Values under `prefix + key` in a Redis or Valkey server at `url` (see `parse_redis_url`).

    With a TTL (`ttl_s`, or `?ttl=SECONDS` in the URL) `put` stores with `SET ... EX ttl` and `get`
    refreshes it (`GETEX ... EX ttl`), so a value read within every TTL never expires; without one,
    values live until deleted or evicted by the server's own policy. `get_many` is one MGET (a
    pipeline of GETEX with a TTL); `contains_many` and `put_many` are one pipeline each (not a
    transaction: a fault may leave some of a batch stored).

    Thread-safe (redis-py's connection pool). Raises redis' exceptions on faults; `classify_fault`
    knows them.
    """

    kind = "redis"

    def __init__(self, url: str, ttl_s: int | None = None, prefix: bytes = b"kvforge:") -> None:
        """Raises ValueError for a bad URL, TTL or prefix. Connects to nothing (see the module)."""
        target = parse_redis_url(url, ttl_s)
        if not isinstance(prefix, bytes):
            raise ValueError(f"the Redis key prefix must be bytes, got {type(prefix).__name__}")
        self.spec = target.spec
        self.ttl_s = target.ttl_s
        self.prefix = prefix
        self._client = redis.Redis.from_url(
            target.client_url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))

    def contains(self, key: bytes) -> bool:
        return bool(self._client.exists(self._name(key)))

    def get(self, key: bytes) -> bytes | None:
        if self.ttl_s is None:
            return self._client.get(self._name(key))
        return self._client.getex(self._name(key), ex=self.ttl_s)

    def put(self, key: bytes, value: bytes) -> None:
        self._client.set(self._name(key), check_value(value), ex=self.ttl_s)

    def delete(self, key: bytes) -> None:
        self._client.delete(self._name(key))

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        check_keys(keys)
        if not keys:
            return []
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.prefix + key)
        return [bool(n) for n in pipe.execute()]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        check_keys(keys)
        if not keys:
            return []
        names = [self.prefix + key for key in keys]
        if self.ttl_s is None:
            return self._client.mget(names)
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.getex(name, ex=self.ttl_s)
        return pipe.execute()

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        items = check_items(items)
        if not items:
            return
        pipe = self._client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(self.prefix + key, value, ex=self.ttl_s)
        pipe.execute()

    def close(self) -> None:
        self._client.close()

    def classify_fault(self, exc: Exception) -> str:
        if isinstance(exc, (AuthenticationError, AuthorizationError, NoPermissionError)):
            return "permission"
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return "connection"
        if isinstance(exc, OutOfMemoryError) or (isinstance(exc, redis.ResponseError) and str(exc).startswith("OOM")):
            return "full"
        if isinstance(exc, redis.RedisError):
            return "other"
        return super().classify_fault(exc)

    def _name(self, key: bytes) -> bytes:
        check_key(key)
        return self.prefix + key
