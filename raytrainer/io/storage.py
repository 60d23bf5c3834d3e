"""Durable checkpoint I/O on local paths and any pyarrow filesystem (file://, s3://, gs://, hdfs://).

A checkpoint file is either the old complete content or the new complete content, never a mix,
and every file written here has a manifest next to it, ``<name>.manifest.json``, that records
its size and sha256. Loading checks the manifest, so a truncated, partly uploaded or damaged file
is reported instead of being loaded.

How a write makes that hold (``write_bytes_atomic``):

1. The new bytes are staged where nobody reads them: local disks and other filesystems with an
   atomic rename get a hidden temporary file ``.<name>.tmp-<id>`` in the same directory, written
   and fsynced. Object stores (S3, GCS) need no staging: an uploaded object becomes visible
   only once its upload completes.
2. The manifest is written (atomically) *before* the data becomes visible. If a file already
   exists at the target, the manifest also lists that file's size and sha256 under
   ``previous``, so the file verifies whichever of the two contents a crash leaves in place.
3. The data becomes visible: ``os.replace`` (then the directory is fsynced), ``FileSystem.move``
   or the object upload.
4. If step 2 listed a previous content, the manifest is rewritten without it.

A crash at any point therefore leaves a file that verifies (old or new content), or no file and
a manifest without its file ("a write never completed"), which ``read_verified`` reports as
missing. Leftover temporary files are removed by the next successful write to the same name.

Files without a manifest were written by other tools (for example a Lightning ``.ckpt``) and
are accepted as they are; ``newest_valid`` additionally checks that such a file is a complete
torch archive. One writer per file at a time is assumed (rank 0 writes, nobody else).

Local paths and ``file://`` use plain OS calls; every other URI goes through
``pyarrow.fs.FileSystem.from_uri``. ``s3://`` URIs honour ``RAYTRAINER_S3_ENDPOINT``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (for MinIO, moto, on-prem S3), and any URI prefix
can be pointed at a filesystem object with ``register_filesystem``; every public function also
takes an explicit ``filesystem=``.

Storage outages. S3 filesystems made here give up on a request after ``RAYTRAINER_STORAGE_TIMEOUT_S / 3``
seconds without a byte moving (curl's low-speed limit) and try 3 times, so a store that stopped answering fails a
call within about ``RAYTRAINER_STORAGE_TIMEOUT_S`` (default 30 s) instead of 3 x 60 s per request. Every remote
call of this module's public functions (and of ``operation`` blocks) logs a warning naming what it writes or
reads once it has run for a third of that bound, and a network failure (timeout, refused or reset connection, an
overloaded store) is raised as ``StorageError`` (``StorageTimeout`` when the store did not answer), an OSError
whose message names the operation and the URI and that carries ``retryable = True``, so a Ray fit with
``max_failures`` retries it. Inside ``skip_unresponsive()`` (teardown after a failure) a store that timed out in
the last bound is not waited for again.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import pickle
import posixpath
import re
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs
import torch

__all__ = [
    "MANIFEST_SUFFIX",
    "STORAGE_TIMEOUT_ENV",
    "CheckpointCorruptError",
    "StorageError",
    "StorageTimeout",
    "exists",
    "join",
    "listdir",
    "load",
    "makedirs",
    "newest_valid",
    "operation",
    "read_verified",
    "register_filesystem",
    "remove",
    "resolve",
    "save",
    "skip_unresponsive",
    "storage_timeout_s",
    "unregister_filesystem",
    "write_bytes_atomic",
]

logger = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "raytrainer-checkpoint-manifest"
MANIFEST_VERSION = 1
_TMP_MARK = ".tmp-"
_HOST = socket.gethostname().replace("~", "-")  # temporary names carry <host>~<pid> of their writer
_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<netloc>[^/?]*)(?P<path>[^?]*)(?:\?(?P<query>.*))?$")
# Schemes whose pyarrow path is "<bucket>/<key>" and whose uploads become visible only when complete.
_BUCKET_SCHEMES = {"s3", "s3a", "gs", "gcs"}
# Schemes whose pyarrow path is the URI's path (the netloc names the host, not part of the path).
_HOST_SCHEMES = {"file", "hdfs", "viewfs"}
_OBJECT_STORE_TYPES = {"s3", "gcs"}
STORAGE_TIMEOUT_ENV = "RAYTRAINER_STORAGE_TIMEOUT_S"
_DEFAULT_STORAGE_TIMEOUT_S = 30.0
_S3_ATTEMPTS = 3  # tries per request (the AWS SDK's standard retry strategy); each may wait bound / attempts
_VERIFY_ATTEMPTS = 3


class CheckpointCorruptError(ValueError):
    """A checkpoint file is damaged or not a checkpoint; the message names the file and the mismatch."""


class StorageError(OSError):
    """A remote storage call failed for a reason that may pass: the store did not answer, refused or reset the
    connection, or said it is overloaded. The message names what was being written or read and the URI.
    ``retryable = True``: a Ray fit with ``max_failures`` retries a rank that raised it."""

    retryable = True

    def __init__(self, message: str, *, uri: str | None = None, what: str | None = None) -> None:
        super().__init__(message)
        self.uri, self.what = uri, what


class StorageTimeout(StorageError):
    """The store did not answer within the bound (``RAYTRAINER_STORAGE_TIMEOUT_S``)."""


def storage_timeout_s() -> float:
    """The bound on a remote storage call against a store that does not answer, in seconds
    (``RAYTRAINER_STORAGE_TIMEOUT_S``, default 30)."""
    raw = os.environ.get(STORAGE_TIMEOUT_ENV, "").strip()
    if not raw:
        return _DEFAULT_STORAGE_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{STORAGE_TIMEOUT_ENV}={raw!r} must be a number of seconds > 0")
    return value


# --------------------------------------------------------------------------------------------
# Resolving paths and URIs to (filesystem, path)
# --------------------------------------------------------------------------------------------

_LOCAL = pafs.LocalFileSystem()
_lock = threading.Lock()
_registry: dict[str, pafs.FileSystem] = {}
_cache: dict[tuple, pafs.FileSystem] = {}


def register_filesystem(prefix: str, filesystem: pafs.FileSystem) -> None:
    """Send every URI that starts with ``prefix`` (e.g. ``"s3://"`` or ``"s3://bucket/"``) to ``filesystem``.

    The registration lives in this process only; ranks on other processes configure S3 endpoints
    through the environment variables instead (see the module docstring).
    """
    match = _URI_RE.match(prefix) if isinstance(prefix, str) else None
    if match is None:
        raise ValueError(f"register_filesystem needs a URI prefix like 's3://' or 's3://bucket/', got {prefix!r}")
    if not isinstance(filesystem, pafs.FileSystem):
        raise TypeError(f"register_filesystem needs a pyarrow.fs.FileSystem, got {type(filesystem).__name__}")
    if match["scheme"].lower() not in _BUCKET_SCHEMES | _HOST_SCHEMES:
        raise ValueError(
            f"cannot map {match['scheme']}:// URIs onto a filesystem object; supported schemes are "
            f"{sorted(_BUCKET_SCHEMES | _HOST_SCHEMES)}"
        )
    with _lock:
        _registry[prefix] = filesystem


def unregister_filesystem(prefix: str) -> None:
    """Undo ``register_filesystem(prefix, ...)``; unknown prefixes are ignored."""
    with _lock:
        _registry.pop(prefix, None)


def _is_uri(path_or_uri: str) -> bool:
    """True for ``scheme://...`` strings, False for plain local paths."""
    return _URI_RE.match(path_or_uri) is not None


def _path_for_scheme(scheme: str, netloc: str, path: str) -> str:
    """The path pyarrow uses inside the filesystem of a ``scheme://netloc/path`` URI."""
    scheme = scheme.lower()
    if scheme in _BUCKET_SCHEMES:
        joined = unquote(netloc + path).rstrip("/")
        if not joined:
            raise ValueError(f"a {scheme}:// URI needs a bucket name, got {scheme}://{netloc}{path}")
        return joined
    if scheme in _HOST_SCHEMES:
        path = unquote(path)
        return path.rstrip("/") or "/"
    raise ValueError(f"cannot map {scheme}:// URIs onto an explicit filesystem object")


def _s3_endpoint_from_env() -> str | None:
    """The S3 endpoint named by the environment, or None for AWS's own endpoints."""
    for var in ("RAYTRAINER_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return None


def _s3_from_env(endpoint: str) -> tuple[tuple, pafs.FileSystem]:
    """Cache key and S3FileSystem (cached or new) for the endpoint and credentials in the environment."""
    if "://" in endpoint:
        scheme, _, host = endpoint.partition("://")
    else:
        scheme, host = "https", endpoint
    host = host.rstrip("/")
    if scheme not in ("http", "https") or not host:
        raise ValueError(
            f"S3 endpoint {endpoint!r} (from RAYTRAINER_S3_ENDPOINT / AWS_ENDPOINT_URL) must look like "
            "'http://host:port' or 'https://host'"
        )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    access = os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    token = os.environ.get("AWS_SESSION_TOKEN") or None
    if not (access and secret):
        access = secret = token = None  # let the AWS SDK find credentials (config files, instance role)
    bound = storage_timeout_s()
    key = ("s3-env", scheme, host, region, access, secret, token, bound)
    with _lock:
        if key in _cache:
            return key, _cache[key]
    # request_timeout is curl's low-speed time on Linux: a request fails once no byte moved for that long (a large
    # upload that keeps moving is never cut). Each of the tries gets a share of the bound.
    per_try = bound / _S3_ATTEMPTS
    fs = pafs.S3FileSystem(
        access_key=access, secret_key=secret, session_token=token, region=region,
        scheme=scheme, endpoint_override=host, connect_timeout=per_try, request_timeout=per_try,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_ATTEMPTS),
        allow_delayed_open=True,  # a small file is one PUT at close, not a multipart upload of 3 to 5 requests
    )
    return key, fs


def resolve(path_or_uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Return the pyarrow filesystem and the path inside it for a local path or a URI.

    Local paths become absolute paths on ``LocalFileSystem``. With ``filesystem`` given, a URI's
    bucket/key (or path) is used inside that filesystem and a plain string is taken as a path in it.
    Otherwise a registered prefix wins, then (for ``s3://``) an endpoint from the environment, then
    ``pyarrow.fs.FileSystem.from_uri``. Filesystems are cached per bucket/host.
    """
    if isinstance(path_or_uri, os.PathLike):
        path_or_uri = os.fspath(path_or_uri)
    if not isinstance(path_or_uri, str) or not path_or_uri:
        raise ValueError(f"expected a non-empty path or URI string, got {path_or_uri!r}")
    match = _URI_RE.match(path_or_uri)

    if filesystem is not None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem= must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}")
        if match is not None:
            return filesystem, _path_for_scheme(match["scheme"], match["netloc"], match["path"])
        if isinstance(filesystem, pafs.LocalFileSystem):
            return filesystem, os.path.abspath(os.path.expanduser(path_or_uri))
        return filesystem, path_or_uri.rstrip("/") or "/"

    if match is None:
        return _LOCAL, os.path.abspath(os.path.expanduser(path_or_uri))

    scheme, netloc, path, query = match["scheme"].lower(), match["netloc"], match["path"], match["query"]
    with _lock:
        prefixes = sorted((p for p in _registry if path_or_uri.startswith(p)), key=len, reverse=True)
        registered = _registry[prefixes[0]] if prefixes else None
    if registered is not None:
        return registered, _path_for_scheme(scheme, netloc, path)

    if scheme == "file":
        return _LOCAL, _path_for_scheme(scheme, netloc, path)

    endpoint = _s3_endpoint_from_env() if scheme in ("s3", "s3a") and not query else None
    if endpoint is not None:
        key, fs = _s3_from_env(endpoint)
        with _lock:
            fs = _cache.setdefault(key, fs)
        return fs, _path_for_scheme(scheme, netloc, path)

    cacheable = scheme in _BUCKET_SCHEMES | _HOST_SCHEMES
    key = ("uri", scheme, netloc, query or "")
    if cacheable:
        with _lock:
            cached = _cache.get(key)
        if cached is not None:
            return cached, _path_for_scheme(scheme, netloc, path)
    try:
        fs, fs_path = pafs.FileSystem.from_uri(path_or_uri)
    except Exception as exc:
        raise ValueError(f"cannot open a filesystem for {path_or_uri!r}: {exc}") from exc
    if cacheable:
        with _lock:
            fs = _cache.setdefault(key, fs)
        return fs, _path_for_scheme(scheme, netloc, path)
    return fs, fs_path


def join(base: str, *parts: str) -> str:
    """Join relative path parts onto a local path or a URI (keeping any ``?query`` at the end)."""
    if isinstance(base, os.PathLike):
        base = os.fspath(base)
    if not isinstance(base, str) or not base:
        raise ValueError(f"join() needs a non-empty base path or URI, got {base!r}")
    for part in parts:
        if not isinstance(part, str) or not part:
            raise ValueError(f"join() parts must be non-empty strings, got {part!r}")
        if part.startswith("/") or _is_uri(part):
            raise ValueError(f"join() parts must be relative, got {part!r} (joining onto {base!r})")
    match = _URI_RE.match(base)
    if match is None:
        return os.path.join(base, *parts)
    joined = posixpath.join(match["path"] or "/", *parts)
    query = f"?{match['query']}" if match["query"] is not None else ""
    return f"{match['scheme']}://{match['netloc']}{joined}{query}"


# --------------------------------------------------------------------------------------------
# Remote calls: a warning when slow, named and retryable errors, no second wait on a dead store
# --------------------------------------------------------------------------------------------

# What a network failure looks like in pyarrow's messages (AWS SDK / curl); FileNotFoundError and the other
# OSError subclasses pyarrow raises are answers from the store, not outages.
_TIMEOUT_MARKS = ("curlCode: 28", "Timeout was reached", "Operation too slow", "timed out", "REQUEST_TIMEOUT",
                  "RequestTimeout")
_OUTAGE_MARKS = _TIMEOUT_MARKS + ("NETWORK_CONNECTION", "curlCode:", "Could not connect", "Connection refused",
                                  "Connection reset", "Connection closed", "Broken pipe", "SLOW_DOWN", "SlowDown",
                                  "SERVICE_UNAVAILABLE", "ServiceUnavailable", "INTERNAL_FAILURE", "InternalError")
_ANSWERS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_call = threading.local()          # .active: this thread is inside a watched call (inner calls are part of it)
_unanswered: dict[int, tuple[float, pafs.FileSystem, str]] = {}  # id(fs) -> (when, fs, what timed out) of timeouts
_skipping = 0                      # > 0 inside skip_unresponsive()
_SKIP_BOUNDS = 10                  # ... which skips a store that timed out less than this many bounds ago


class _Watchdog:
    """One daemon thread that logs a warning for each remote call still running past its warning time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, str]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None

    def add(self, at: float, message: str) -> int:
        with self._cond:
            self._next += 1
            self._due[self._next] = (at, message)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._run, name="raytrainer-storage-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return self._next

    def remove(self, token: int) -> None:
        with self._cond:
            self._due.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                late = [t for t, (at, _) in self._due.items() if at <= now]
                messages = [self._due.pop(t)[1] for t in late]
                if not messages:
                    soonest = min((at for at, _ in self._due.values()), default=None)
                    self._cond.wait(None if soonest is None else soonest - now)
                    continue
            for message in messages:
                logger.warning("%s", message)


_watchdog = _Watchdog()


@contextmanager
def skip_unresponsive() -> Iterator[None]:
    """Inside this block a remote call to a store that timed out less than 10 bounds ago fails at once
    (``StorageTimeout``) instead of waiting the bound again: for the teardown of a run that storage already failed."""
    global _skipping
    with _lock:
        _skipping += 1
    try:
        yield
    finally:
        with _lock:
            _skipping -= 1


@contextmanager
def operation(what: str, uri: str, filesystem: pafs.FileSystem | None = None, nbytes: int | None = None
              ) -> Iterator[None]:
    """Watch one remote storage call made in the block (``what``: "writing", "reading checkpoint", ...): a warning
    once it has run for a third of the bound, a network failure raised as ``StorageError``/``StorageTimeout`` naming
    ``what`` and ``uri``, other OSErrors noted with them. Local paths, and calls inside another watched call of the
    same thread, pass through untouched."""
    if filesystem is None:
        try:
            filesystem = resolve(uri)[0]
        except ValueError:
            filesystem = _LOCAL
    if _is_local(filesystem) or getattr(_call, "active", False):
        yield
        return
    bound = storage_timeout_s()
    key = id(filesystem)
    if _skipping:
        with _lock:
            earlier = _unanswered.get(key)
        if earlier is not None and time.monotonic() - earlier[0] < _SKIP_BOUNDS * bound:
            ago = time.monotonic() - earlier[0]
            raise StorageTimeout(f"{what} {uri}: not attempted: the same storage did not answer {ago:.0f} s ago "
                                 f"({earlier[2]})", uri=uri, what=what)
    size = "" if not nbytes else f" ({nbytes / 1e6:.1f} MB)" if nbytes >= 100_000 else f" ({nbytes} bytes)"
    start = time.monotonic()
    token = _watchdog.add(start + bound / _S3_ATTEMPTS, (
        f"storage is slow: {what} {uri}{size} has not finished after {bound / _S3_ATTEMPTS:.0f} s; it fails if the "
        f"storage gives no answer for {bound:.0f} s ({STORAGE_TIMEOUT_ENV})"))
    _call.active = True
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        text = str(exc)
        if isinstance(exc, _ANSWERS) or not any(mark in text for mark in _OUTAGE_MARKS):
            exc.add_note(f"while {what} {uri}")
            raise
        elapsed = time.monotonic() - start
        first_line = text.splitlines()[0] if text else type(exc).__name__
        if any(mark in text for mark in _TIMEOUT_MARKS):
            with _lock:
                _unanswered[key] = (time.monotonic(), filesystem, f"{what} {uri}")
            raise StorageTimeout(
                f"{what} {uri}: storage did not answer within {bound:g} s (gave up after {elapsed:.1f} s; "
                f"{STORAGE_TIMEOUT_ENV} sets the bound): {first_line}", uri=uri, what=what) from exc
        raise StorageError(f"{what} {uri}: storage could not be reached (gave up after {elapsed:.1f} s): "
                           f"{first_line}", uri=uri, what=what) from exc
    finally:
        _call.active = False
        _watchdog.remove(token)


def _watched(what: str) -> Any:
    """Run the decorated ``fn(uri, ..., filesystem=None)`` as one watched remote call (see ``operation``)."""
    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(uri: Any, *args: Any, filesystem: pafs.FileSystem | None = None, **kwargs: Any) -> Any:
            try:
                fs = resolve(uri, filesystem)[0]
            except (TypeError, ValueError):  # fn reports the bad argument
                return fn(uri, *args, filesystem=filesystem, **kwargs)
            data = args[0] if args else kwargs.get("data")
            nbytes = memoryview(data).nbytes if isinstance(data, (bytes, bytearray, memoryview)) else None
            with operation(what, os.fspath(uri), fs, nbytes):
                return fn(uri, *args, filesystem=filesystem, **kwargs)
        return wrapper
    return decorate



# --------------------------------------------------------------------------------------------
# Low-level reads and writes
# --------------------------------------------------------------------------------------------

def _is_local(fs: pafs.FileSystem) -> bool:
    """True when plain OS calls (fsync, os.replace) can be used on this filesystem's paths."""
    return isinstance(fs, pafs.LocalFileSystem)


def _is_object_store(fs: pafs.FileSystem) -> bool:
    """True for stores where an upload becomes visible only when complete (so no temp file is needed)."""
    return fs.type_name in _OBJECT_STORE_TYPES


def _split(path: str, fs: pafs.FileSystem) -> tuple[str, str]:
    """(directory, base name) of a path in ``fs``."""
    return os.path.split(path) if _is_local(fs) else posixpath.split(path)


def _tmp_name(name: str) -> str:
    """A hidden, unique sibling name used to stage ``name`` before it is renamed into place."""
    return f".{name}{_TMP_MARK}{_HOST}~{os.getpid()}~{uuid.uuid4().hex[:12]}"


def remove_dead_writers_temporaries(dir_uri: str, older_than_s: float = 3600.0) -> list[str]:
    """Delete the temporary files that interrupted writes left in the local directory ``dir_uri`` (a crashed run's
    ``.last.ckpt.tmp-*``), never one a live writer owns: a file of this host is removed when its writer's process is
    gone, one of another host (or of an older raytrainer) when it is older than ``older_than_s``. Returns the paths
    removed; object stores get no temporary files."""
    fs, directory = resolve(dir_uri)
    if not _is_local(fs):
        return []
    removed = []
    try:
        entries = [e for e in os.scandir(directory) if e.is_file() and _is_tmp_name(e.name)]
    except FileNotFoundError:
        return []
    now = time.time()
    for entry in entries:
        writer = entry.name.split(_TMP_MARK, 1)[1].rsplit("~", 1)[0]
        host, _, pid = writer.rpartition("~")
        if host == _HOST and pid.isdigit():
            dead = not _process_alive(int(pid))
        else:
            try:
                dead = now - entry.stat().st_mtime > older_than_s
            except FileNotFoundError:
                continue
        if dead:
            _delete_quietly(fs, entry.path)
            removed.append(entry.path)
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted writes in %s", len(removed), dir_uri)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _is_tmp_name(name: str) -> bool:
    """True for temporary names made by ``_tmp_name``."""
    return name.startswith(".") and _TMP_MARK in name


def fsync_dir(directory: str) -> None:
    """Persist the entries of ``directory`` (new files, renames) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_type(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    """The type of ``path`` (NotFound when it does not exist)."""
    if _is_local(fs):
        if os.path.isfile(path):
            return pafs.FileType.File
        if os.path.isdir(path):
            return pafs.FileType.Directory
        return pafs.FileType.NotFound if not os.path.lexists(path) else pafs.FileType.Unknown
    return fs.get_file_info(path).type


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    """All bytes of ``path``; FileNotFoundError when it does not exist."""
    if _is_local(fs):
        with open(path, "rb") as f:
            return f.read()
    with fs.open_input_file(path) as f:  # one ranged GET; open_input_stream reads in small chunks
        return f.read()


def _stage(fs: pafs.FileSystem, path: str, data: Any) -> str | None:
    """Write ``data`` to a hidden sibling of ``path`` and return its name (None for object stores)."""
    if _is_object_store(fs):
        return None
    directory, name = _split(path, fs)
    tmp = (os.path.join if _is_local(fs) else posixpath.join)(directory, _tmp_name(name))
    try:
        if _is_local(fs):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise
    return tmp


def _publish(fs: pafs.FileSystem, path: str, data: Any, tmp: str | None) -> None:
    """Make the staged ``tmp`` (or, for object stores, a fresh upload of ``data``) visible at ``path``."""
    if tmp is None:
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    try:
        if _is_local(fs):
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
        else:
            fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise


def _write_raw_atomic(fs: pafs.FileSystem, path: str, data: Any) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new bytes, never a part."""
    _publish(fs, path, data, _stage(fs, path, data))


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete ``path`` if it exists, logging (not raising) failures: used for cleanup only."""
    try:
        if _is_local(fs):
            os.unlink(path)
        else:
            fs.delete_file(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("could not remove %s: %s", path, exc)


def _remove_stale_tmp(fs: pafs.FileSystem, path: str) -> None:
    """Remove temporary files left behind by interrupted writes of ``path`` or of its manifest."""
    if _is_object_store(fs):
        return
    directory, name = _split(path, fs)
    prefixes = (f".{name}{_TMP_MARK}", f".{name}{MANIFEST_SUFFIX}{_TMP_MARK}")
    try:
        if _is_local(fs):
            names = [e.name for e in os.scandir(directory) if e.name.startswith(prefixes)]
            stale = [os.path.join(directory, n) for n in names]
        else:
            infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
            stale = [i.path for i in infos if i.base_name.startswith(prefixes)]
    except OSError as exc:
        logger.warning("could not list %s to remove temporary files: %s", directory, exc)
        return
    for tmp in stale:
        _delete_quietly(fs, tmp)


# --------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------

def _digest(data: Any) -> dict[str, Any]:
    """Size and sha256 of ``data`` (bytes-like), as stored in a manifest."""
    view = memoryview(data)
    return {"size": view.nbytes, "sha256": hashlib.sha256(view).hexdigest()}


def _manifest_bytes(name: str, digest: dict[str, Any], previous: list[dict[str, Any]]) -> bytes:
    """The JSON manifest for a file called ``name`` with content ``digest``."""
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "name": name,
        "size": digest["size"],
        "sha256": digest["sha256"],
        "written_at": time.time(),
    }
    if previous:
        manifest["previous"] = previous  # the content in place until this write finishes
    return json.dumps(manifest, indent=1).encode()


def _parse_manifest(raw: bytes, manifest_uri: str) -> dict[str, Any]:
    """Check and return a manifest read from ``manifest_uri``; CheckpointCorruptError if it is malformed."""
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(f"manifest {manifest_uri} is not valid JSON ({exc}); the checkpoint "
                                     "cannot be verified — delete both files or rewrite the checkpoint") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointCorruptError(f"{manifest_uri} is not a raytrainer checkpoint manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise CheckpointCorruptError(
            f"manifest {manifest_uri} has format_version {version!r}; this raytrainer reads up to "
            f"{MANIFEST_VERSION} — upgrade raytrainer to read it"
        )
    entries = [manifest, *manifest.get("previous", [])]
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise CheckpointCorruptError(f"manifest {manifest_uri} lacks a valid size/sha256 entry: {entry!r}")
    return manifest


def _read_manifest(fs: pafs.FileSystem, path: str, manifest_uri: str) -> dict[str, Any] | None:
    """The parsed manifest at ``path``, or None when there is none."""
    try:
        raw = _read_all(fs, path)
    except FileNotFoundError:
        return None
    return _parse_manifest(raw, manifest_uri)


def _mismatch(data: bytes, manifest: dict[str, Any]) -> tuple[str | None, bool]:
    """(None, matched_previous) when ``data`` matches the manifest, else (what mismatched, False)."""
    size = len(data)
    sha = None
    for i, entry in enumerate([manifest, *manifest.get("previous", [])]):
        if entry["size"] != size:
            continue
        sha = sha or hashlib.sha256(data).hexdigest()
        if entry["sha256"] == sha:
            return None, i > 0
    if size != manifest["size"]:
        return (f"size is {size} bytes but the manifest records {manifest['size']} bytes "
                "(the file is truncated, partly written or was replaced)"), False
    return (f"sha256 is {sha} but the manifest records {manifest['sha256']} "
            "(the content changed after it was written)"), False


def _manifest_uri(uri: str) -> str:
    """The manifest's path/URI for a checkpoint path/URI (before any ``?query``), for messages."""
    match = _URI_RE.match(uri)
    if match is None or match["query"] is None:
        return uri + MANIFEST_SUFFIX
    return f"{match['scheme']}://{match['netloc']}{match['path']}{MANIFEST_SUFFIX}?{match['query']}"


def _check_target(path: str, uri: str, fs: pafs.FileSystem) -> None:
    """Reject names that the manifest/temp-file scheme reserves, or that are no file names."""
    name = _split(path, fs)[1]
    match = _URI_RE.match(uri)
    names_dir = match["path"] in ("", "/") or match["path"].endswith("/") if match else uri.endswith(os.sep)
    if not name or names_dir:
        raise ValueError(f"checkpoint path {uri!r} names a directory; give a file name like {join(uri, 'last.ckpt')!r}")
    if name.endswith(MANIFEST_SUFFIX) or _is_tmp_name(name):
        raise ValueError(f"checkpoint path {uri!r} uses a name reserved for manifests/temporary files; "
                         "pick another name")


# --------------------------------------------------------------------------------------------
# Public byte-level API
# --------------------------------------------------------------------------------------------

@_watched("writing")
def write_bytes_atomic(uri: str, data: bytes, *, manifest: bool = True,
                       filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``data`` to ``uri`` so readers see the old or the new complete file, with a manifest to verify it.

    The parent directory must exist (``makedirs``); object stores have no directories to create.
    ``manifest=False`` keeps the all-or-nothing replacement but writes no manifest (and removes a
    stale one), for files other tools read, such as a logger's ``metrics.csv``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_bytes_atomic needs bytes, got {type(data).__name__}")
    fs, path = resolve(uri, filesystem)
    _check_target(path, uri, fs)
    kind = _file_type(fs, path)
    if kind == pafs.FileType.Directory:
        raise IsADirectoryError(f"cannot write {uri}: it is an existing directory")
    directory = _split(path, fs)[0]
    if _is_local(fs) and not os.path.isdir(directory):
        kind_of_parent = "is not a directory" if os.path.exists(directory) else "does not exist"
        error = NotADirectoryError if os.path.exists(directory) else FileNotFoundError
        raise error(f"cannot write {uri}: its parent {directory} {kind_of_parent}; "
                    "create it first (raytrainer.io.storage.makedirs)")

    manifest_path = path + MANIFEST_SUFFIX
    if not manifest:
        tmp = _stage(fs, path, data)
        try:
            _delete_quietly(fs, manifest_path)  # it would describe the old content
        except BaseException:
            if tmp is not None:
                _delete_quietly(fs, tmp)
            raise
        _publish(fs, path, data, tmp)
        _remove_stale_tmp(fs, path)
        return

    digest = _digest(data)
    previous: list[dict[str, Any]] = []
    if kind == pafs.FileType.File:
        try:
            old = _read_manifest(fs, manifest_path, _manifest_uri(uri))
        except CheckpointCorruptError:
            old = None
        if old is not None and not old.get("previous"):
            previous = [{"size": old["size"], "sha256": old["sha256"]}]
        else:  # no manifest, or the last write was interrupted: learn what is there now
            current = _digest(_read_all(fs, path))
            previous = [current]
        if previous[0] == digest:
            previous = []

    name = _split(path, fs)[1]
    tmp = _stage(fs, path, data)
    try:
        _write_raw_atomic(fs, manifest_path, _manifest_bytes(name, digest, previous))
    except BaseException:
        if tmp is not None:
            _delete_quietly(fs, tmp)
        raise
    _publish(fs, path, data, tmp)
    if previous:
        _write_raw_atomic(fs, manifest_path, _manifest_bytes(name, digest, []))
    _remove_stale_tmp(fs, path)


def _read_checked(uri: str, filesystem: pafs.FileSystem | None) -> tuple[bytes, dict[str, Any] | None]:
    """Bytes of ``uri`` and its manifest (None if it has none), after verifying them against each other."""
    fs, path = resolve(uri, filesystem)
    manifest_uri = _manifest_uri(uri)
    manifest_path = path + MANIFEST_SUFFIX
    problem = None
    for _ in range(_VERIFY_ATTEMPTS):
        manifest = _read_manifest(fs, manifest_path, manifest_uri)
        try:
            data = _read_all(fs, path)
        except FileNotFoundError:
            hint = (" (a manifest exists without it: a write to it was interrupted before it finished)"
                    if manifest is not None else "")
            raise FileNotFoundError(f"checkpoint {uri} does not exist{hint}") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"checkpoint {uri} is a directory, not a checkpoint file") from None
        if manifest is None:
            return data, None
        problem, from_previous = _mismatch(data, manifest)
        if problem is None:
            if from_previous:
                logger.warning("checkpoint %s still holds the content from before an interrupted write", uri)
            return data, manifest
        # A writer may have replaced the file between our two reads; retry while the manifest moves.
        if _read_manifest(fs, manifest_path, manifest_uri) == manifest:
            break
    raise CheckpointCorruptError(f"checkpoint {uri} is corrupt: {problem}; manifest: {manifest_uri}")


@_watched("reading")
def read_verified(uri: str, *, filesystem: pafs.FileSystem | None = None) -> bytes:
    """Read ``uri``, checking size and sha256 against its manifest when it has one.

    Raises CheckpointCorruptError naming the file and the mismatch, FileNotFoundError when missing.
    Files without a manifest (written by other tools) are returned as they are.
    """
    return _read_checked(uri, filesystem)[0]


def _archive_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete torch zip archive (None when it is one)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
                return "is a zip file but not a torch checkpoint (no data.pkl inside)"
            bad = archive.testzip()
    except zipfile.BadZipFile as exc:
        return f"is not a torch checkpoint archive ({exc})"
    except (OSError, EOFError, zipfile.LargeZipFile, RuntimeError) as exc:
        return f"is a damaged zip archive ({exc})"
    if bad is not None:
        return f"is a damaged torch archive (CRC mismatch in member {bad!r})"
    return None


# --------------------------------------------------------------------------------------------
# Checkpoint dicts
# --------------------------------------------------------------------------------------------

def save(obj: dict, uri: str, *, filesystem: pafs.FileSystem | None = None) -> None:
    """``torch.save`` a checkpoint dict to ``uri`` atomically, with a manifest."""
    if not isinstance(obj, dict):
        raise TypeError(f"save() writes checkpoint dicts, got {type(obj).__name__} for {uri}")
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    view = buffer.getbuffer()
    try:
        with operation("writing checkpoint", uri, filesystem, view.nbytes):
            write_bytes_atomic(uri, view, filesystem=filesystem)
    finally:
        view.release()


def load(uri: str, map_location: Any = None, weights_only: bool = True, *,
         filesystem: pafs.FileSystem | None = None) -> dict:
    """Verify and ``torch.load`` the checkpoint dict at ``uri``.

    ``weights_only=True`` refuses arbitrary pickled objects; pass False only for files you trust.
    """
    with operation("reading checkpoint", uri, filesystem):
        data, manifest = _read_checked(uri, filesystem)
    if manifest is None and data[:2] == b"PK":  # no manifest (another tool wrote it, or it was copied alone):
        problem = _archive_problem(data)        # the zip members' CRCs catch a flipped bit before it loads
        if problem is not None:
            raise CheckpointCorruptError(f"checkpoint {uri} {problem}; it has no manifest to compare with, so it "
                                         "cannot be repaired here: use another checkpoint or a backup copy")
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and "weights only load failed" in str(exc).lower():
            raise pickle.UnpicklingError(
                f"checkpoint {uri} holds Python objects that weights_only=True refuses to load; "
                f"call load(..., weights_only=False) if you trust this file. torch said: {exc}"
            ) from exc
        problem = _archive_problem(data)
        raise CheckpointCorruptError(f"checkpoint {uri} {problem or 'cannot be unpickled'}: {exc}") from exc
    except Exception as exc:
        problem = _archive_problem(data)
        if problem is not None:
            raise CheckpointCorruptError(f"checkpoint {uri} {problem}; torch.load said: "
                                         f"{type(exc).__name__}: {exc}") from exc
        exc.add_note(f"while loading checkpoint {uri}")
        raise
    if not isinstance(obj, dict):
        raise CheckpointCorruptError(f"{uri} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


# --------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------

@_watched("checking")
def exists(uri: str, *, filesystem: pafs.FileSystem | None = None) -> bool:
    """True if a file or directory exists at ``uri``."""
    fs, path = resolve(uri, filesystem)
    return _file_type(fs, path) != pafs.FileType.NotFound


@_watched("removing checkpoint")
def remove(uri: str, *, missing_ok: bool = False, filesystem: pafs.FileSystem | None = None) -> None:
    """Delete the checkpoint file at ``uri``, its manifest and leftover temporary files."""
    fs, path = resolve(uri, filesystem)
    _check_target(path, uri, fs)
    kind = _file_type(fs, path)
    if kind == pafs.FileType.Directory:
        raise IsADirectoryError(f"remove() deletes checkpoint files; {uri} is a directory")
    if kind == pafs.FileType.NotFound and not missing_ok:
        raise FileNotFoundError(f"cannot remove checkpoint {uri}: it does not exist")
    if kind != pafs.FileType.NotFound:
        if _is_local(fs):
            os.unlink(path)
        else:
            fs.delete_file(path)
    _delete_quietly(fs, path + MANIFEST_SUFFIX)  # data first: a crash in between leaves an orphan manifest only
    _remove_stale_tmp(fs, path)


_CLAIM_MARK = ".claim-"  # object stores: the marker a writer leaves in a directory it claimed


@_watched("claiming directory")
def claim_dir(uri: str, *, filesystem: pafs.FileSystem | None = None) -> bool:
    """Create the directory ``uri`` exclusively: True when this call made it, False when it existed or another
    writer (another process or host) claimed it at the same moment. Local and network filesystems: ``mkdir``,
    which is atomic. Object stores (no exclusive create in pyarrow): write a unique marker inside, then list; the
    claim holds only when the marker is the directory's only entry. Two writers racing cannot both see only their
    own marker (a listing made after a write completes shows it), so at most one wins; both may lose, and then
    both try the next name."""
    fs, path = resolve(uri, filesystem)
    if _is_local(fs):
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            os.mkdir(path)
        except FileExistsError:
            return False
        return True
    if fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        return False  # already holds something: someone else's
    fs.create_dir(path, recursive=True)
    marker = f"{_CLAIM_MARK}{_HOST}~{os.getpid()}~{uuid.uuid4().hex[:12]}"
    with fs.open_output_stream(posixpath.join(path, marker)) as out:
        out.write(b"")
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
    if names == [marker]:
        return True
    _delete_quietly(fs, posixpath.join(path, marker))
    return False


@_watched("creating directory")
def makedirs(uri: str, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Create the directory ``uri`` and its parents; existing directories are fine."""
    fs, path = resolve(uri, filesystem)
    if not _is_local(fs):
        fs.create_dir(path, recursive=True)  # errors are named by the watched call (_watched)
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        exc.add_note(f"while creating checkpoint directory {uri}")
        raise


def _natural_key(name: str) -> tuple:
    """Sort key that orders 'step=9' before 'step=10'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def _is_checkpoint_name(name: str) -> bool:
    """False for manifests, temporary files and other hidden files."""
    return not (name.endswith(MANIFEST_SUFFIX) or name.startswith("."))


@_watched("listing")
def listdir(dir_uri: str, *, missing_ok: bool = False, filesystem: pafs.FileSystem | None = None) -> list[str]:
    """Full paths/URIs of the checkpoint files directly in ``dir_uri``, in natural name order.

    Manifests, temporary files, hidden files and subdirectories are left out. A missing directory
    raises FileNotFoundError unless ``missing_ok``.
    """
    fs, path = resolve(dir_uri, filesystem)
    kind = _file_type(fs, path)
    if kind == pafs.FileType.NotFound:
        if missing_ok:
            return []
        raise FileNotFoundError(f"checkpoint directory {dir_uri} does not exist")
    if kind != pafs.FileType.Directory:
        raise NotADirectoryError(f"listdir() needs a directory; {dir_uri} is a file")
    if _is_local(fs):
        names = [e.name for e in os.scandir(path) if e.is_file()]
    else:
        names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File]
    return [join(dir_uri, n) for n in sorted(filter(_is_checkpoint_name, names), key=_natural_key)]


def newest_valid(candidates: list[str], *, filesystem: pafs.FileSystem | None = None
                 ) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest candidate that verifies, and the (file, reason) pairs skipped on the way.

    Newest means latest modification time, ties broken by natural name order (``step=10`` after
    ``step=9``). A file with a manifest must match it; a file without one must be a complete torch
    zip archive (every member's CRC checks) whose pickle holds nothing a weights_only load refuses.
    Missing candidates are listed as skipped. Storage
    errors other than missing or corrupt files propagate instead of silently falling back.
    """
    if isinstance(candidates, str):
        raise TypeError("newest_valid() takes a list of paths/URIs, not a single string")
    skipped: list[tuple[str, str]] = []
    ranked = []
    for uri in dict.fromkeys(candidates):
        fs, path = resolve(uri, filesystem)
        with operation("checking checkpoint", uri, fs):
            info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            skipped.append((uri, "does not exist" if info.type == pafs.FileType.NotFound else "is not a file"))
            continue
        ranked.append((info.mtime_ns or 0, _natural_key(_split(path, fs)[1]), uri))
    ranked.sort(reverse=True)
    for _, _, uri in ranked:
        try:
            with operation("reading checkpoint", uri, filesystem):
                data, manifest = _read_checked(uri, filesystem)
        except (CheckpointCorruptError, FileNotFoundError) as exc:
            skipped.append((uri, str(exc)))
            continue
        if manifest is None:
            problem = _archive_problem(data) or _unsafe_payload(data)
            if problem is not None:
                skipped.append((uri, f"{uri} {problem}"))
                continue
        return uri, skipped
    return None, skipped


def _unsafe_payload(data: bytes) -> str | None:
    """Why a checkpoint (a complete torch archive) cannot be resumed with weights_only=True: the Python objects it
    pickles that torch does not allow (read statically from its pickle, nothing is run); None when there are none."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - a pickle that cannot even be disassembled
        return f"has a pickle that cannot be read ({type(exc).__name__}: {exc})"
    if unsafe:
        return (f"holds Python objects that a weights_only load refuses ({', '.join(unsafe[:3])}); load it "
                "explicitly with weights_only=False if you trust it")
    return None

