"""CSVLogger: ``<save_dir>/<name>/version_N/metrics.csv`` and ``hparams.yaml``, as Lightning writes them."""
from __future__ import annotations

import csv
import io
import os
from typing import Any

from raytrainer.loggers.base import Logger


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class CSVLogger(Logger):
    """Buffers metric rows in memory and rewrites the CSV every ``flush_logs_every_n_steps`` rows."""

    LOGGER_JOIN_CHAR = "-"
    CLAIMS_VERSIONS = True  # resolving the version creates its directory exclusively (see claim_version)

    def __init__(self, save_dir: str, name: str = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100) -> None:
        """Arguments as Lightning's; ``prefix`` is joined to every metric name with "-" (not to ``step``)."""
        self._save_dir = str(save_dir)
        self._name = name or ""
        self._version = version
        self._prefix = prefix
        self._rows: list[dict[str, Any]] = []
        self._keys: list[str] = []
        self._flush_every = flush_logs_every_n_steps
        self._unflushed = 0

    def state_dict(self) -> dict[str, Any]:
        """The version and the rows written so far, so the driver's copy (and later runs) append to them."""
        return {"version": self._version, "rows": [dict(r) for r in self._rows], "keys": list(self._keys),
                "unflushed": self._unflushed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._version = state.get("version", self._version)
        self._rows = [dict(r) for r in state.get("rows", [])]
        self._keys = list(state.get("keys", []))
        self._unflushed = int(state.get("unflushed", 0))

    @property
    def name(self) -> str:
        return self._name

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def root_dir(self) -> str:
        return _join(self._save_dir, self._name) if self._name else self._save_dir

    @property
    def version(self) -> int | str:
        if self._version is None:
            self._version = self._next_version()
        return self._version

    @property
    def log_dir(self) -> str:
        v = self.version
        return _join(self.root_dir, v if isinstance(v, str) else f"version_{v}")

    def _next_version(self) -> int:
        return claim_version(self.root_dir)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **add_prefix(metrics, self._prefix, self.LOGGER_JOIN_CHAR)}
        for k in row:
            if k not in self._keys:
                self._keys.append(k)
        self._rows.append(row)
        self._unflushed += 1
        if self._unflushed >= self._flush_every:
            self.save()

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        import yaml

        from raytrainer.io import storage

        text = yaml.safe_dump(_yaml_safe(dict(params)), sort_keys=False) if params else "{}\n"
        storage.makedirs(self.log_dir)
        storage.write_bytes_atomic(_join(self.log_dir, "hparams.yaml"), text.encode(), manifest=False)

    def save(self) -> None:
        """Rewrite metrics.csv with every row so far (columns may have grown)."""
        from raytrainer.io import storage

        if not self._rows:
            return
        buf = io.StringIO()
        keys = sorted(self._keys)  # Lightning's CSVLogger sorts every column name, "epoch" and "step" included
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        storage.makedirs(self.log_dir)
        storage.write_bytes_atomic(_join(self.log_dir, "metrics.csv"), buf.getvalue().encode(), manifest=False)
        self._unflushed = 0

    def resume_from_step(self, step: int) -> None:
        """Continue this run's metrics.csv after a restart: keep rows up to ``step``, drop the lost ones."""
        from raytrainer.io import storage

        path = _join(self.log_dir, "metrics.csv")
        if not storage.exists(path):
            return
        rows = list(csv.DictReader(io.StringIO(storage.read_verified(path).decode())))
        kept = [{k: _number(v) for k, v in r.items() if v not in ("", None)} for r in rows
                if int(float(r.get("step") or 0)) <= step]
        self._rows = kept + [r for r in self._rows if r.get("step", 0) > step]
        self._keys = list(dict.fromkeys(k for r in self._rows for k in r))

    def finalize(self, status: str) -> None:
        self.save()

    def __getstate__(self) -> dict[str, Any]:
        # resolve the version before shipping to a worker so every process writes the same folder
        _ = self.version
        return self.__dict__.copy()


_CLAIM_ATTEMPTS = 1000


def claim_version(root_dir: str) -> int:
    """The next free ``version_N`` under ``root_dir``, its directory created exclusively for the caller, so two
    runs started at the same moment into one root never share a version (issue: both used ``version_0``)."""
    from raytrainer.io import storage

    n = next_version(root_dir)
    for _ in range(_CLAIM_ATTEMPTS):
        if storage.claim_dir(_join(root_dir, f"version_{n}")):
            return n
        n += 1
    raise RuntimeError(f"could not claim a version directory under {root_dir} in {_CLAIM_ATTEMPTS} attempts "
                       f"(versions {n - _CLAIM_ATTEMPTS}..{n - 1} were all taken by other runs); pass "
                       "version=... to the logger.")


def next_version(root_dir: str) -> int:
    """One more than the largest ``version_N`` directory under ``root_dir`` (0 when there is none)."""
    from pyarrow import fs as pafs

    from raytrainer.io import storage

    fs, path = storage.resolve(root_dir)
    try:
        with storage.operation("listing the versions in", root_dir, fs):
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except storage.StorageError:
        raise  # storage is down: claiming a version would wait for it once more
    except Exception:
        return 0
    nums = []
    for info in infos:
        base = info.base_name
        if info.type == pafs.FileType.Directory and base.startswith("version_") and base[8:].isdigit():
            nums.append(int(base[8:]))
    return max(nums) + 1 if nums else 0


def add_prefix(metrics: dict[str, Any], prefix: str, sep: str) -> dict[str, Any]:
    """Metric names with ``prefix`` and ``sep`` in front (Lightning's logger prefix); unchanged without one."""
    return {f"{prefix}{sep}{k}": v for k, v in metrics.items()} if prefix else dict(metrics)


def _join(base: str, part: str) -> str:
    return base.rstrip("/") + "/" + part if _is_uri(base) else os.path.join(base, part)


def _number(v: str) -> Any:
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _yaml_safe(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _yaml_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_yaml_safe(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return repr(v)
