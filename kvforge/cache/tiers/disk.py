"""DiskTier: one file per key under a directory, written atomically, least recently used evicted first.

    | path                            | content                                                   |
    | <dir>/<shard>/<name>.kvb        | one value, byte for byte                                  |
    | <dir>/<shard>/.tmp-<pid>-<rand> | a value being written by process <pid>; renamed over      |
    |                                 | <name>.kvb (os.replace) only once it is whole             |

<name> is the key in lowercase hex, or "h" + the hex sha256 of the key for keys longer than
`LONG_KEY_BYTES` (a file name holds at most 255 bytes); <shard> is the first two hex digits of it.

A process killed mid-write leaves a temp file, never a partial <name>.kvb; temp files whose writer
is gone (or older than an hour) are removed when a DiskTier opens the directory. Without fsync a
power loss may still truncate a recently renamed file: the codec's checksum catches that.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path

from kvforge.cache.tiers.base import Tier, check_capacity, check_key, check_value, format_size

LONG_KEY_BYTES = 120
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600  # a temp file this old is a crash's leftover even if its pid was reused
_NAME = re.compile(r"(?:[0-9a-f]{2})+|h[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")


def key_name(key: bytes) -> str:
    """The file name stem of `key` (see the module docstring)."""
    if len(key) > LONG_KEY_BYTES:
        return "h" + hashlib.sha256(key).hexdigest()
    return key.hex()


def _shard(name: str) -> str:
    return name[1:3] if name.startswith("h") else name[:2]


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to the file `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DiskTier(Tier):
    """Values as files under the directory `path` (created if missing), at most `capacity_bytes`
    bytes of them (file contents; directory entries are not counted).

    Recency lives in an in-memory index built at open from the files' mtimes, oldest first. `get`
    makes a key the most recently used here and sets its file's mtime to now, so a process opening
    the directory later sees the same order; `contains` does not. `put` writes a temp file in the
    key's shard and renames it over the final name, replacing any old value, then evicts least
    recently used files until the budget holds; a value larger than the whole budget is not stored
    (and drops the key's old value). A failed write removes its temp file and re-raises.

    Several processes may share the directory: `contains` and `get` ask the filesystem, so they
    find files others wrote (adopting them into the index as most recently used) and answer a miss
    for files others removed. Each process enforces the budget over what it knows (the files seen
    at open, written or found since), so give them all the same budget; the directory may exceed
    it until a put evicts what another process wrote meanwhile.

    Thread-safe: data is read and written outside the lock; renames, unlinks, mtimes and the index
    change under it, so within one process the index matches the files.
    """

    kind = "disk"

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int) -> None:
        """Raises ValueError if `capacity_bytes` is not a positive int, or naming the reason if `path`
        exists and is not a directory or cannot be created or written. Removes temp files left by
        writers that died; evicts the oldest files if the directory holds more than the budget."""
        self.capacity_bytes = check_capacity(capacity_bytes)
        self.path = Path(path)
        self.spec = f"disk:{self.path}:{format_size(capacity_bytes)}"
        _prepare_directory(self.path)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # name -> file size, least recently used first
        self._used = 0
        with self._lock:
            self._scan()
            self._evict_to(self.capacity_bytes)

    @property
    def used_bytes(self) -> int:
        """Bytes of the files in the index."""
        return self._used

    def __len__(self) -> int:
        return len(self._index)

    def file_path(self, key: bytes) -> Path:
        """Where `key`'s value lives (whether or not it is stored)."""
        check_key(key)
        name = key_name(key)
        return self.path / _shard(name) / f"{name}.kvb"

    def contains(self, key: bytes) -> bool:
        path, name = self.file_path(key), key_name(key)
        with self._lock:
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                self._forget(name)
                return False
            if name not in self._index:
                self._note(name, size)
            return True

    def get(self, key: bytes) -> bytes | None:
        path, name = self.file_path(key), key_name(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            with self._lock:
                self._forget(name)
            return None
        with self._lock:
            now = time.time_ns()
            try:
                os.utime(path, ns=(now, now))
            except FileNotFoundError:  # removed since we read it: what we read is still whole
                self._forget(name)
            else:
                self._note(name, len(data))
        return data

    def put(self, key: bytes, value: bytes) -> None:
        path, name = self.file_path(key), key_name(key)
        value = check_value(value)
        if len(value) > self.capacity_bytes:
            self.delete(key)
            return
        temp = self._write_temp(path.parent, value)
        try:
            with self._lock:
                os.replace(temp, path)
                self._note(name, len(value))
                self._evict_to(self.capacity_bytes)
        except BaseException:
            _remove(temp)  # still there if the rename failed
            raise

    def delete(self, key: bytes) -> None:
        path, name = self.file_path(key), key_name(key)
        with self._lock:
            self._forget(name)
            _remove(path)

    def _write_temp(self, directory: Path, value: bytes) -> Path:
        """A new temp file in `directory` (created if missing) holding `value`, its mtime now."""
        temp = directory / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:16]}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(temp, flags, 0o644)
        except FileNotFoundError:  # a new shard (or removed by hand)
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, flags, 0o644)
        try:
            try:
                _write_all(fd, value)
                now = time.time_ns()  # finer than the kernel's file clock, so open-time order is exact
                os.utime(fd, ns=(now, now))
            finally:
                os.close(fd)
        except BaseException:
            _remove(temp)
            raise
        return temp

    # ---- under the lock ----------------------------------------------------------------------

    def _note(self, name: str, size: int) -> None:
        """Index `name` with `size` bytes as the most recently used."""
        self._used += size - self._index.get(name, 0)
        self._index[name] = size
        self._index.move_to_end(name)

    def _forget(self, name: str) -> None:
        self._used -= self._index.pop(name, 0)

    def _evict_to(self, limit: int) -> None:
        while self._used > limit:
            name, size = self._index.popitem(last=False)
            self._used -= size
            _remove(self.path / _shard(name) / f"{name}.kvb")

    def _scan(self) -> None:
        """Index the directory's value files, oldest mtime first; remove temp files left by crashes."""
        found = []
        now = time.time()
        with os.scandir(self.path) as top:
            for shard in top:
                if shard.name.startswith(TEMP_PREFIX):
                    _remove_if_abandoned(shard.path, shard.name, now)
                if not (_SHARD.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
                    continue
                with os.scandir(shard.path) as files:
                    for f in files:
                        if f.name.startswith(TEMP_PREFIX):
                            _remove_if_abandoned(f.path, f.name, now)
                            continue
                        name = f.name.removesuffix(".kvb")
                        if name == f.name or not _NAME.fullmatch(name) or _shard(name) != shard.name:
                            continue  # not ours: leave it alone
                        try:
                            st = f.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            found.append((st.st_mtime_ns, name, st.st_size))
        for _, name, size in sorted(found):
            self._note(name, size)


def _remove_if_abandoned(path: str, name: str, now: float) -> None:
    """Remove the temp file `path` unless its writer (the pid in its name) is alive and it is recent.
    Best effort: a temp file that cannot be removed is left."""
    pid_text = name[len(TEMP_PREFIX):].partition("-")[0]
    pid = int(pid_text) if pid_text.isdigit() else 0
    try:
        if pid > 0 and _pid_alive(pid) and now - os.stat(path).st_mtime < STALE_TEMP_SECONDS:
            return
        os.unlink(path)
    except OSError:
        pass


def _prepare_directory(path: Path) -> None:
    """Create `path` if missing and check that files can be created in it; ValueError naming why not."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"disk tier path {str(path)!r} exists and is not a directory: give a directory "
                         f"(it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the disk tier directory {str(path)!r}: {e.strerror or e}") from e
    probe = path / f"{TEMP_PREFIX}{os.getpid()}-probe-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"the disk tier directory {str(path)!r} is not writable: {e.strerror or e}") from e
