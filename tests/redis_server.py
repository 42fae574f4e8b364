"""A real redis-server for tests, on a free loopback port, in a directory of its own, with no persistence.

    server = start_redis(tmp_path, maxmemory="1mb", maxmemory_policy="noeviction")
    RedisTier(server.url)            # redis://127.0.0.1:<port>/0 (also server.unix_url)
    server.stop(kill=True)           # SIGKILL, as a crash; stop() is a clean SIGTERM
    server.restart()                 # the same port, socket and options, empty
    server.stop()                    # always, at teardown

Each keyword becomes a redis-server option (underscores turn into dashes). A missing redis-server is
a RuntimeError naming the fix, never a skip: CI installs it (make setup installs the Debian package),
so the tier tests must fail where it is missing. Fixtures: tests/cache/tiers/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 10.0
MISSING = ("redis-server is not installed (not on PATH): the Redis tier tests run a real server. "
           "Install it with `make setup` or `apt-get install redis-server` (Debian/Ubuntu; `brew install redis` "
           "on macOS)")


class RedisServer:
    """One redis-server process (see the module docstring). Not thread-safe; stop() is idempotent."""

    def __init__(self, executable: str, directory: Path, port: int, config: dict[str, object]) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port
        self.config = config
        self.unix_path = os.path.join(tempfile.gettempdir(), f"kvforge-redis-{os.getpid()}-{port}.sock")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}?db=0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self) -> None:
        """Run the server and wait until it answers PING; RuntimeError with its log if it does not."""
        assert self.process is None or self.process.poll() is not None, "the server is running"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no",
                "--logfile", str(self.log_path), "--unixsocket", self.unix_path, "--unixsocketperm", "700"]
        for name, value in self.config.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(kill=True)
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING "
                                   f"(exit code {self.process.returncode}); its log:\n{log}")
            time.sleep(0.01)

    def ping(self) -> bool:
        """Whether the server answers PING on its port now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """End the server: SIGTERM and wait (SIGKILL if it lingers), or SIGKILL at once with `kill`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop the server if it runs, then start it again on the same port with the same options."""
        self.stop()
        self.start()


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp_path: Path, **config: object) -> RedisServer:
    """A running redis-server with its files under `tmp_path`/redis-<port> (see the module docstring).
    Raises RuntimeError if redis-server is not installed or will not start."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError(MISSING)
    for attempt in range(3):  # a free port may be taken before the server binds it
        port = free_port()
        server = RedisServer(executable, tmp_path / f"redis-{port}", port, dict(config))
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
