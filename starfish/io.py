"""Atomic outputs with JSON sidecars, and content hashes.

Every file the library writes goes through `atomic_write`: a temp file in the same folder,
then `os.replace`, so a crash never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

SIDECAR_SUFFIX = ".meta.json"


# Digests of files already read, by (algorithm, device, inode, size, mtime, ctime). Any write
# moves a file's ctime (which no call can set back), so a hit is the same bytes; a file changed
# less than RACY_NS before it was read is never remembered, since a second write within the
# same clock tick would leave its times as they were.
_DIGESTS: dict[tuple[Any, ...], str] = {}
RACY_NS = 2_000_000_000
_REMEMBERED_AT_MOST = 4096


def _identity(algorithm: str, stat: os.stat_result) -> tuple[Any, ...]:
    return algorithm, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, streamed. An unchanged file is read once per process: the
    steps of a flow check the same checkpoints (a second or so per 350 MB each time)."""
    with open(path, "rb") as handle:
        identity = _identity(algorithm, os.fstat(handle.fileno()))
        if identity in _DIGESTS:
            return _DIGESTS[identity]
        started = time.time_ns()
        digest = hashlib.new(algorithm)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
        unchanged = _identity(algorithm, os.fstat(handle.fileno())) == identity
    hexdigest = digest.hexdigest()
    if unchanged and started - max(identity[4], identity[5]) > RACY_NS:
        if len(_DIGESTS) >= _REMEMBERED_AT_MOST:
            _DIGESTS.clear()
        _DIGESTS[identity] = hexdigest
    return hexdigest


def sha256_file(path: str | Path) -> str:
    return file_digest(path, "sha256")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def process_alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (an exited, unreaped child does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _remove_dead_writers_temps(target: Path) -> None:
    """Delete temp files of `target` whose writer, on this host, died mid-write (SIGKILL, OOM)."""
    prefix = f".{target.name}.{socket.gethostname()}-"
    for tmp in target.parent.glob(glob.escape(prefix) + "*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error removed.

    The temp file's name carries the writer's host and pid, so the next write of `path` deletes
    what a killed writer left. The file gets the mode a plain `open` would give it (0666 less
    the umask), not mkstemp's 0600, also when the writer recreated it (safetensors does). It is
    flushed to disk before the rename and the folder after it, so a power loss leaves the old
    file or the whole new one, never a renamed empty one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{socket.gethostname()}-{os.getpid()}.", suffix=".tmp",
                               dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync(target.parent, os.O_DIRECTORY)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: str | Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, fixed separators, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=2, default=str) + "\n").encode()


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, canonical_json(obj))


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_with_sidecar(path: str | Path, write: Callable[[Path], None], **fields: Any) -> dict[str, Any]:
    """Write an output with `write(temp path)` and its `<path>.meta.json` (its sha256 plus `fields`)
    as one unit: both are finished in temp files, the old sidecar is removed, then the output
    and the new sidecar are renamed into place. A failure at any point leaves the old pair, or
    the new output with no sidecar yet: never an output beside another output's sidecar."""
    target, side = Path(path), sidecar_path(path)
    with atomic_path(side) as side_tmp:  # renamed second
        with atomic_path(target) as out_tmp:  # renamed first
            write(out_tmp)
            meta = {"file": target.name, "sha256": sha256_file(out_tmp), **fields}
            side_tmp.write_bytes(canonical_json(meta))
            side.unlink(missing_ok=True)
    return meta


# Bounds on JSON that may be hostile, checked before parsing: deeper nesting would exhaust the
# parser's recursion, and a longer integer costs a quadratic conversion (Python refuses at 4,300
# digits with a ValueError). No file starfish writes comes near either.
MAX_JSON_DEPTH = 64
MAX_JSON_INT_DIGITS = 30
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"')  # possessive: linear, no per-character state
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class UnsafeJSON(ValueError):
    """JSON refused by its bounds before it was parsed."""


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise UnsafeJSON(f"it holds an integer of {len(digits.lstrip('-'))} digits (at most {MAX_JSON_INT_DIGITS})")
    return int(digits)


def loads_bounded(text: str) -> Any:
    """`json.loads` of text from a file that may be hostile: nesting beyond MAX_JSON_DEPTH and
    integers beyond MAX_JSON_INT_DIGITS digits raise UnsafeJSON, the depth before parsing."""
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise UnsafeJSON(f"it nests deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(text, parse_int=_bounded_int)


def read_json(path: str | Path) -> Any:
    return loads_bounded(Path(path).read_text())
