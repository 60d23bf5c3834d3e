"""Sharded checkpoints: a directory every rank writes its shards into with ``torch.distributed.checkpoint`` (DCP).

Layout (Lightning's FSDP ``state_dict_type="sharded"`` layout, so Lightning's tools read ours and we read theirs)::

    <name>.ckpt/                       a directory
        .metadata                      DCP's index of the shards (written by the coordinator, rank 0)
        __<rank>_0.distcp              the shards of rank <rank>: keys "model" (the module's state dict) and
                                       "optimizer_<i>" (optimizer i's state, keyed by parameter names)
        meta.pt                        everything else of the checkpoint dict (epoch, loops, callbacks, hparams,
                                       raytrainer's position/RNG...), torch.save'd by rank 0
        raytrainer-manifest.json       names, sizes and sha256 of every file above (written last)

Crash safety: ranks write into a hidden sibling ``.<name>.tmp-sharded``; once every shard is written (DCP's own
final collective), rank 0 writes ``meta.pt`` and the manifest, fsyncs, and renames the sibling to ``<name>``. A crash
leaves only the hidden sibling, which nothing lists and the next save of that name removes. A directory without a
manifest (e.g. Lightning's) is accepted; with one, every listed file must match it (``verify_sharded``).

API for a strategy (all ranks call both, with the same path; the process group must be initialized when world > 1)::

    save_sharded(dirpath, module, optimizers, meta, rank=r, barrier=fn)   # meta: the checkpoint dict minus
                                                                          # "state_dict"/"optimizer_states"
    meta = load_sharded(dirpath, module, optimizers, strict=True)         # reshards onto this world's layout

``module`` may be a plain module, or one sharded with FSDP2 ``fully_shard`` (DTensor parameters) on any world size;
loading reshards: a checkpoint written by N ranks loads on M ranks or in one plain process.
``consolidate(dirpath)`` turns a directory into one Lightning-format checkpoint dict (plain tensors).

Paths: local or shared-filesystem paths (``file://`` too). Other ``pyarrow.fs`` URIs are refused with a clear error.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from raytrainer.io import storage

DCP_METADATA_FILE = ".metadata"            # torch.distributed.checkpoint's index
META_FILE = "meta.pt"                      # lightning_fabric.utilities.load._METADATA_FILENAME
MANIFEST_FILE = "raytrainer-manifest.json"
MANIFEST_FORMAT = "raytrainer-sharded-manifest"
MANIFEST_VERSION = 1
MODEL_KEY = "model"                        # Lightning's FSDPStrategy keys inside the DCP state
OPTIMIZER_KEY = "optimizer_{}"
_TMP_SUFFIX = ".tmp-sharded"
_CHUNK = 1 << 22


class ShardedCheckpointError(storage.CheckpointCorruptError):
    """A sharded checkpoint directory is incomplete, damaged, or does not fit what is loaded into it."""


# ------------------------------------------------------------------------------------------------ paths
def _local_dir(uri: str) -> str:
    """The local path of ``uri`` (callers handle other filesystems through ``_remote`` first)."""
    fs, path = storage.resolve(os.fspath(uri))
    if not storage._is_local(fs):
        raise ValueError(f"sharded checkpoint {uri!r} is not on this machine's filesystem")
    return path


def _remote(uri: str) -> tuple[Any, str] | None:
    """(pyarrow filesystem, path) when ``uri`` is on a filesystem other than this machine's; None for local paths."""
    fs, path = storage.resolve(os.fspath(uri))
    return None if storage._is_local(fs) else (fs, path.rstrip("/"))


def _remote_type(remote: tuple[Any, str], name: str | None = None) -> Any:
    fs, path = remote
    return fs.get_file_info(f"{path}/{name}" if name else path).type


def is_sharded_checkpoint(uri: str) -> bool:
    """True when ``uri`` is a directory holding a DCP checkpoint: a local one (ours or Lightning's), or one on another
    filesystem whose manifest (written last) is there."""
    import pyarrow.fs as pafs

    remote = _remote(uri)
    if remote is not None:
        return _remote_type(remote, MANIFEST_FILE) == pafs.FileType.File
    return os.path.isfile(os.path.join(_local_dir(uri), DCP_METADATA_FILE))


def _tmp_sibling(path: str) -> str:
    """The hidden staging directory of ``path`` (the same name on every rank, so no broadcast is needed)."""
    parent, name = os.path.split(path.rstrip(os.sep))
    return os.path.join(parent, f".{name}{_TMP_SUFFIX}")


def is_directory(uri: str) -> bool:
    """True when ``uri`` is an existing directory (a checkpoint candidate that is no file)."""
    import pyarrow.fs as pafs

    remote = _remote(uri)
    if remote is not None:
        return _remote_type(remote) == pafs.FileType.Directory
    return os.path.isdir(_local_dir(uri))


def list_sharded(dir_uri: str, extension: str) -> list[str]:
    """Checkpoint directories named ``*<extension>`` directly in ``dir_uri`` (hidden staging ones left out)."""
    import pyarrow.fs as pafs

    remote = _remote(dir_uri)
    if remote is not None:
        fs, path = remote
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        entries = [i.base_name for i in infos if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
                   and i.base_name.endswith(extension)]
        return [storage.join(dir_uri, n) for n in sorted(entries)]
    try:
        entries = [e.name for e in os.scandir(_local_dir(dir_uri)) if e.is_dir() and not e.name.startswith(".")
                   and e.name.endswith(extension)]
    except FileNotFoundError:
        return []
    return [storage.join(dir_uri, n) for n in sorted(entries)]


def written_at(uri: str) -> float:
    """When a checkpoint file or sharded directory was completed (its manifest's mtime for a directory), in s."""
    fs, path = storage.resolve(str(uri))
    remote = _remote(uri)
    if remote is not None and is_directory(uri):
        return (fs.get_file_info(f"{remote[1]}/{MANIFEST_FILE}").mtime_ns or 0) / 1e9
    if is_directory(uri):
        for name in (MANIFEST_FILE, META_FILE, DCP_METADATA_FILE):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.getmtime(os.path.join(path, name))
        return os.path.getmtime(path)
    return (fs.get_file_info(path).mtime_ns or 0) / 1e9


# ------------------------------------------------------------------------------------------------ manifest
def _file_digest(path: str) -> dict[str, Any]:
    """Size and sha256 of a file, streamed (the same fields as a single file's manifest in io/storage.py)."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def _manifest_bytes(files: dict[str, dict[str, Any]]) -> bytes:
    return json.dumps({"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "written_at": time.time(),
                       "files": dict(sorted(files.items()))}, indent=1).encode()


def _write_manifest(path: str) -> None:
    """List every file of the directory ``path`` with its size and sha256 in the manifest (fsynced)."""
    names = sorted(n for n in os.listdir(path) if n != MANIFEST_FILE and os.path.isfile(os.path.join(path, n)))
    with open(os.path.join(path, MANIFEST_FILE), "wb") as f:
        f.write(_manifest_bytes({n: _file_digest(os.path.join(path, n)) for n in names}))
        f.flush()
        os.fsync(f.fileno())


def read_manifest(uri: str) -> dict[str, Any] | None:
    """The manifest of a sharded checkpoint directory, None when it has none (e.g. written by Lightning)."""
    remote = _remote(uri)
    file = f"{remote[1]}/{MANIFEST_FILE}" if remote is not None else os.path.join(_local_dir(uri), MANIFEST_FILE)
    try:
        if remote is not None:
            with remote[0].open_input_stream(file) as f:
                manifest = json.loads(f.read())
        else:
            with open(file) as f:
                manifest = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ShardedCheckpointError(f"sharded checkpoint {uri}: its manifest {file} cannot be read ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise ShardedCheckpointError(f"sharded checkpoint {uri}: {file} is not a raytrainer sharded manifest")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise ShardedCheckpointError(f"sharded checkpoint {uri}: manifest format_version "
                                     f"{manifest['format_version']} is newer than this raytrainer reads; upgrade it")
    return manifest


def verify_sharded(uri: str, checksums: bool = True, part: tuple[int, int] = (0, 1)) -> None:
    """Check that ``uri`` is a complete sharded checkpoint: sizes (and sha256 unless ``checksums=False``) against its
    manifest. ``part=(i, n)`` checksums only every n-th file from the i-th (ranks share the reading).

    Raises FileNotFoundError / ShardedCheckpointError naming the directory and the file that does not match."""
    remote = _remote(uri)
    if remote is not None:
        _verify_remote_sizes(uri, remote)
        return
    path = _local_dir(uri)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"sharded checkpoint {uri} does not exist (or is not a directory)")
    if not os.path.isfile(os.path.join(path, DCP_METADATA_FILE)):
        raise ShardedCheckpointError(f"{uri} is a directory but not a sharded checkpoint: it has no "
                                     f"{DCP_METADATA_FILE} (torch.distributed.checkpoint's index)")
    manifest = read_manifest(uri)
    if manifest is None:
        return
    for i, (name, entry) in enumerate(sorted(manifest["files"].items())):
        file = os.path.join(path, name)
        try:
            size = os.path.getsize(file)
        except FileNotFoundError:
            raise ShardedCheckpointError(f"sharded checkpoint {uri} is incomplete: {name} is missing") from None
        if size != entry["size"]:
            raise ShardedCheckpointError(f"sharded checkpoint {uri} is corrupt: {name} has {size} bytes but the "
                                         f"manifest records {entry['size']} (truncated or replaced)")
        if checksums and i % part[1] == part[0]:
            sha = _file_digest(file)["sha256"]
            if sha != entry["sha256"]:
                raise ShardedCheckpointError(f"sharded checkpoint {uri} is corrupt: {name} has sha256 {sha} but the "
                                             f"manifest records {entry['sha256']} (its content changed)")


def _verify_remote_sizes(uri: str, remote: tuple[Any, str]) -> None:
    """A directory on another filesystem: its manifest must be there and every file must have the recorded size
    (checksums are checked when the files are read, see ``_readable``)."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise ShardedCheckpointError(f"sharded checkpoint {uri} is incomplete or missing: it has no "
                                     f"{MANIFEST_FILE}, which is written last")
    fs, path = remote
    for name, entry in sorted(manifest["files"].items()):
        info = fs.get_file_info(f"{path}/{name}")
        if info.size is None:
            raise ShardedCheckpointError(f"sharded checkpoint {uri} is incomplete: {name} is missing")
        if info.size != entry["size"]:
            raise ShardedCheckpointError(f"sharded checkpoint {uri} is corrupt: {name} has {info.size} bytes but the "
                                         f"manifest records {entry['size']}")


@contextlib.contextmanager
def _readable(uri: str) -> Iterator[str]:
    """A local directory with the checkpoint's files: the directory itself, or (another filesystem) a temporary
    download of every file its manifest lists, each checked against its recorded sha256, removed afterwards."""
    remote = _remote(uri)
    if remote is None:
        yield _local_dir(uri)
        return
    manifest = read_manifest(uri)
    if manifest is None:
        raise ShardedCheckpointError(f"sharded checkpoint {uri} is incomplete or missing: it has no "
                                     f"{MANIFEST_FILE}, which is written last")
    fs, path = remote
    local = tempfile.mkdtemp(prefix="raytrainer-sharded-read-")
    try:
        for name, entry in manifest["files"].items():
            dst = os.path.join(local, name)
            with fs.open_input_stream(f"{path}/{name}") as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
            got = _file_digest(dst)
            if (got["size"], got["sha256"]) != (entry["size"], entry["sha256"]):
                raise ShardedCheckpointError(f"sharded checkpoint {uri} is corrupt: {name} does not match its "
                                             f"manifest ({got['size']} bytes, sha256 {got['sha256']})")
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _upload(fs: Any, src: str, dst: str) -> None:
    with open(src, "rb") as f, fs.open_output_stream(dst) as out:
        shutil.copyfileobj(f, out, _CHUNK)


# ------------------------------------------------------------------------------------------------ save
def _dist() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_barrier() -> None:
    """Barrier over the default process group (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _dcp_state(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, Any]:
    """This rank's model/optimizer state in the layout written to the DCP files (DTensors stay sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {MODEL_KEY: get_model_state_dict(module)}
    for i, opt in enumerate(optimizers):
        state[OPTIMIZER_KEY.format(i)] = get_optimizer_state_dict(module, opt)
    return state


def save_sharded(dirpath: str, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer],
                 meta: dict[str, Any], *, rank: int | None = None,
                 barrier: Callable[[], None] | None = None, async_group: Any = False,
                 copies: Sequence[str] = ()) -> PendingSave | None:
    """Every rank writes its shards of ``module``/``optimizers`` to the directory ``dirpath``; rank 0 adds ``meta``.

    ``meta`` is the rest of the checkpoint dict (no "state_dict"/"optimizer_states"; only rank 0's is written).
    ``barrier`` defaults to the default process group's. The directory appears under ``dirpath`` only complete.
    ``copies``: more directories with the same content (e.g. last.ckpt beside epoch=...ckpt), copied by rank 0.

    ``async_group``: False writes now and returns None. Otherwise (a process group kept for checkpoints, or None
    without one) the shards are copied to host memory now and written by a background thread: the returned
    PendingSave's ``wait()`` returns once this rank's part is done (on rank 0: the directory is published).
    """
    for key in ("state_dict", "optimizer_states"):
        if key in meta:
            raise ValueError(f"save_sharded: meta must not hold {key!r}; the module and optimizers are saved as "
                             "shards. Pass the checkpoint dict without it.")
    rank = _dist()[0] if rank is None else rank
    barrier = barrier or _default_barrier
    remote = _remote(dirpath)
    if remote is None:
        path = _local_dir(dirpath)
        tmp = _tmp_sibling(path)
        if os.path.isfile(path):
            raise FileExistsError(f"cannot write sharded checkpoint {dirpath}: a file exists there; remove it or "
                                  "pick another name")
    else:  # every rank writes into a local staging directory of its own, then uploads its files
        path, tmp = dirpath, tempfile.mkdtemp(prefix="raytrainer-sharded-")
    state = _dcp_state(module, list(optimizers))  # collectives (FSDP2 may all-gather nothing here): every rank
    if rank == 0 and remote is None:
        shutil.rmtree(tmp, ignore_errors=True)   # left by an interrupted save
        os.makedirs(tmp)
    elif rank == 0:
        remove_sharded(dirpath, missing_ok=True)  # the old content of this name (manifest first) before any upload
    barrier()
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(tmp)
    single = _dist()[1] == 1
    if async_group is False:
        dcp.save(state, storage_writer=writer, no_dist=single)
        # dcp.save returns on rank 0 after every rank's shards are written and .metadata is committed.
        if remote is not None:
            _finish_remote(tmp, dirpath, meta, copies, rank, None)
        elif rank == 0:
            _finish(tmp, path, meta, copies)
        barrier()
        return None
    from raytrainer.checkpoint.host_copy import to_host

    meta = to_host(meta) if rank == 0 else meta  # training may change the live tensors before the thread writes
    future = dcp.async_save(state, storage_writer=writer, process_group=async_group, no_dist=single)
    if remote is not None:
        def finish() -> None:
            _finish_remote(tmp, dirpath, meta, copies, rank, async_group)
    elif rank == 0:
        def finish() -> None:
            _finish(tmp, path, meta, copies)
    return PendingSave(dirpath, future, finish if remote is not None or rank == 0 else None)


def _finish_remote(staging: str, uri: str, meta: dict[str, Any], copies: Sequence[str], rank: int,
                   group: Any) -> None:
    """(every rank, its shards written to ``staging``) Upload them; rank 0 then uploads .metadata, meta.pt and,
    last, the manifest of every rank's files, so the directory counts as complete only when all of it is there."""
    import torch.distributed as dist

    fs, path = _remote(uri)  # type: ignore[misc]
    try:
        if rank == 0:
            torch.save(meta, os.path.join(staging, META_FILE))
        digests = {}
        for name in sorted(os.listdir(staging)):
            local = os.path.join(staging, name)
            _upload(fs, local, f"{path}/{name}")
            digests[name] = _file_digest(local)
        world = _dist()[1]
        every: list[Any] = [digests]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, digests, group=group)
        if rank != 0:
            return
        files = {n: d for part in every for n, d in part.items()}
        for target in [uri, *copies]:
            t_fs, t_path = _remote(target) or (None, None)
            if t_fs is None:
                raise ValueError(f"sharded checkpoint copies must be on the same kind of filesystem: {target}")
            if target != uri:
                remove_sharded(target, missing_ok=True)
                for name in files:
                    t_fs.copy_file(f"{path}/{name}", f"{t_path}/{name}")
            with t_fs.open_output_stream(f"{t_path}/{MANIFEST_FILE}") as out:
                out.write(_manifest_bytes(files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish(tmp: str, path: str, meta: dict[str, Any], copies: Sequence[str] = ()) -> None:
    """(rank 0, every shard written) Add meta.pt and the manifest, publish the directory, then its copies."""
    torch.save(meta, os.path.join(tmp, META_FILE))
    _write_manifest(tmp)
    storage.fsync_dir(tmp)
    _publish_dir(tmp, path)
    for uri in copies:
        other = _local_dir(uri)
        if os.path.isfile(other):
            raise FileExistsError(f"cannot write sharded checkpoint {uri}: a file exists there; remove it or pick "
                                  "another name")
        staging = _tmp_sibling(other)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(path, staging)
        storage.fsync_dir(staging)
        _publish_dir(staging, other)


class PendingSave:
    """A sharded save in flight: DCP's background write of this rank's shards, then (rank 0) the publication."""

    def __init__(self, uri: str, future: Any, finish: Callable[[], None] | None) -> None:
        import threading

        self.uri = uri
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._complete, args=(future, finish), daemon=True,
                                        name="raytrainer-sharded-save")
        self._thread.start()

    def _complete(self, future: Any, finish: Callable[[], None] | None) -> None:
        try:
            future.result()  # on rank 0 this returns once every rank's shards and .metadata are written
            if finish is not None:
                finish()
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def succeeded(self) -> bool:
        """True once this rank's part is written without error (rank 0: the directory is published)."""
        return not self._thread.is_alive() and self._error is None

    def wait(self, timeout: float | None = 600) -> None:
        """Block until this rank's part is written (rank 0: published); re-raise a failed write."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the sharded checkpoint {self.uri} was not written within {timeout} s")
        if self._error is not None:
            raise ShardedCheckpointError(f"writing the sharded checkpoint {self.uri} failed: "
                                         f"{type(self._error).__name__}: {self._error}") from self._error


def _publish_dir(tmp: str, path: str) -> None:
    """Rename the complete staging directory ``tmp`` to ``path`` (replacing an older directory of that name)."""
    old = None
    if os.path.isdir(path):
        old = f"{_tmp_sibling(path)}-old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(tmp, path)
    storage.fsync_dir(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_sharded(dirpath: str, missing_ok: bool = False) -> None:
    """Delete a sharded checkpoint directory: the manifest first, so a crash midway leaves no "valid" directory."""
    remote = _remote(dirpath)
    if remote is not None:
        fs, rpath = remote
        if not is_directory(dirpath):
            if missing_ok:
                return
            raise FileNotFoundError(f"cannot remove sharded checkpoint {dirpath}: no such directory")
        try:
            fs.delete_file(f"{rpath}/{MANIFEST_FILE}")
        except (FileNotFoundError, OSError):
            pass
        fs.delete_dir(rpath)
        return
    path = _local_dir(dirpath)
    if not os.path.isdir(path):
        if missing_ok:
            return
        raise FileNotFoundError(f"cannot remove sharded checkpoint {dirpath}: no such directory")
    if not os.path.isfile(os.path.join(path, DCP_METADATA_FILE)):
        raise ValueError(f"refusing to remove {dirpath}: it is not a sharded checkpoint (no {DCP_METADATA_FILE})")
    for name in (MANIFEST_FILE, DCP_METADATA_FILE):
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
    shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------ load
def _verify_on_all_ranks(uri: str) -> None:
    """Verify the directory, the checksum work split over the ranks; every rank raises if any rank found a problem."""
    import torch.distributed as dist

    rank, world = _dist()
    problem: Exception | None = None
    try:
        verify_sharded(uri, checksums=True, part=(rank, world))
    except (OSError, ValueError) as exc:
        problem = exc
    if world == 1:
        if problem is not None:
            raise problem
        return
    found: list[Any] = [None] * world
    dist.all_gather_object(found, None if problem is None else f"{type(problem).__name__}: {problem}")
    bad = [f for f in found if f]
    if problem is not None:
        raise problem
    if bad:
        raise ShardedCheckpointError(f"another rank found sharded checkpoint {uri} unusable: {bad[0]}")


def _stored_keys(path: str) -> set[str]:
    """Top-level keys ("model", "optimizer_0"...) in a DCP directory's index."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(path).read_metadata()
    return {k.split(".", 1)[0] for k in md.state_dict_metadata}


def load_sharded(dirpath: str, module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer] = (),
                 *, strict: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load a sharded checkpoint into ``module`` and ``optimizers`` (resharded onto this world) and return its meta.

    Every rank calls it. ``verify`` checks sizes and checksums against the manifest first (split over the ranks).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    with _readable(dirpath) as path:  # another filesystem: downloaded (checksums checked) for the read
        if verify:
            _verify_on_all_ranks(path)
        elif not os.path.isfile(os.path.join(path, DCP_METADATA_FILE)):
            raise FileNotFoundError(f"{dirpath} is not a sharded checkpoint directory (no {DCP_METADATA_FILE})")
        optimizers = list(optimizers)
        stored = _stored_keys(path)
        wanted = [MODEL_KEY] + [OPTIMIZER_KEY.format(i) for i in range(len(optimizers))]
        missing = [k for k in wanted if k not in stored]
        if missing:
            raise ShardedCheckpointError(
                f"sharded checkpoint {dirpath} has no {missing} (it holds {sorted(stored)}): it was saved with fewer "
                f"optimizers than the {len(optimizers)} given, or without optimizer state (weights only); load it "
                "with optimizers=() to take the weights.")
        state = _dcp_state(module, optimizers)
        if not strict:
            state[MODEL_KEY] = _present_only(state[MODEL_KEY], path)
        import torch.distributed.checkpoint as dcp

        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=_dist()[1] == 1)
        set_model_state_dict(module, state[MODEL_KEY], options=StateDictOptions(strict=strict))
        for i, opt in enumerate(optimizers):
            set_optimizer_state_dict(module, opt, state[OPTIMIZER_KEY.format(i)])
        return read_meta(path)


def _present_only(model_state: dict[str, Any], path: str) -> dict[str, Any]:
    """The entries of ``model_state`` that the checkpoint holds (for strict=False loads)."""
    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: v for k, v in model_state.items() if f"{MODEL_KEY}.{k}" in md}


def read_meta(dirpath: str, weights_only: bool = True) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (``meta.pt``); {} when the directory has none."""
    remote = _remote(dirpath)
    if remote is not None:
        import io

        file = f"{remote[1]}/{META_FILE}"
        try:
            with remote[0].open_input_stream(file) as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        meta = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=weights_only)
    else:
        file = os.path.join(_local_dir(dirpath), META_FILE)
        if not os.path.isfile(file):
            return {}
        meta = torch.load(file, map_location="cpu", weights_only=weights_only)
    if not isinstance(meta, dict):
        raise ShardedCheckpointError(f"{file} holds a {type(meta).__name__}, not a dict")
    return meta


# ------------------------------------------------------------------------------------------------ consolidate
def consolidate(dirpath: str, verify: bool = True, weights_only: bool = True) -> dict[str, Any]:
    """One Lightning-format checkpoint dict (plain CPU tensors) from a sharded directory (ours or Lightning's).

    Needs no process group and no GPU; the whole model and optimizer state must fit in this process's memory.
    Optimizer states are re-keyed from parameter names to indices (torch's ``Optimizer.state_dict`` layout), so
    the file also resumes a non-sharded run.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    with _readable(dirpath) as path:  # another filesystem: downloaded (checksums checked) for the read
        if verify:
            verify_sharded(path)
        elif not os.path.isfile(os.path.join(path, DCP_METADATA_FILE)):
            raise FileNotFoundError(f"{dirpath} is not a sharded checkpoint directory (no {DCP_METADATA_FILE})")
        state: dict[str, Any] = {}
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        ckpt = read_meta(path, weights_only=weights_only)
    if MODEL_KEY not in state:
        raise ShardedCheckpointError(f"sharded checkpoint {dirpath} holds no {MODEL_KEY!r} entry (keys: "
                                     f"{sorted(state)}); it was not written by raytrainer or Lightning's FSDPStrategy")
    ckpt["state_dict"] = state.pop(MODEL_KEY)
    n = sum(1 for k in state if k.startswith("optimizer_"))
    if n:
        ckpt["optimizer_states"] = [_indexed_optimizer_state(state.pop(OPTIMIZER_KEY.format(i))) for i in range(n)]
    return ckpt


def _indexed_optimizer_state(osd: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (DCP/FSDP layout) re-keyed by index, as ``Optimizer.state_dict``."""
    groups = [dict(g) for g in osd.get("param_groups", [])]
    index: dict[Any, int] = {}
    for g in groups:
        g["params"] = [index.setdefault(p, len(index)) for p in g["params"]]
    state = {index[k]: v for k, v in osd.get("state", {}).items() if k in index}
    return {"state": state, "param_groups": groups}
