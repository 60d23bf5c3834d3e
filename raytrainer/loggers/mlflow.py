"""MLFlowLogger: metrics, flat hyper-parameters and (optionally) checkpoints in an MLflow run, on a local ``file:``
store or any tracking server (``http://...``), with Lightning's arguments.

On Ray the driver creates the run before the logger travels to the ranks, so every rank 0 (the first one and any
that replaces it after a failure) writes to that one run, and the driver's logger names it afterwards.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from typing import Any, Literal

from raytrainer.loggers import _run_helpers as helpers
from raytrainer.loggers.base import Logger

log = logging.getLogger(__name__)

_FILE_PREFIX = "file:"
_BAD_KEY_CHARS = re.compile(r"[^a-zA-Z0-9_/. -]+")  # what Lightning strips from metric names for MLflow
_STATUS = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}
_PARAM_VALUE_CHARS = 250  # Lightning truncates parameter values to this length
_METRICS_PER_BATCH = 1000  # MLflow's limits for one log_batch request
_PARAMS_PER_BATCH = 100


class MLFlowLogger(Logger):
    """Logs to one MLflow run: created on first use (experiment ``experiment_name``), or the run ``run_id``."""

    def __init__(self, experiment_name: str = "lightning_logs", run_name: str | None = None,
                 tracking_uri: str | None = None, tags: dict[str, Any] | None = None,
                 save_dir: str | None = "./mlruns", log_model: Literal[True, False, "all"] = False,
                 prefix: str = "", artifact_location: str | None = None, run_id: str | None = None) -> None:
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise ModuleNotFoundError("MLFlowLogger needs the mlflow package: pip install mlflow") from exc
        if log_model not in (True, False, "all"):
            raise ValueError(f"MLFlowLogger(log_model={log_model!r}): use False, True (upload checkpoints at the "
                             "end) or 'all' (upload each checkpoint as it is saved)")
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not tracking_uri:
            if not save_dir:
                raise ValueError("MLFlowLogger needs a tracking_uri or a save_dir for a local file: store")
            # absolute, so that ranks on Ray (whose working directory may differ) write to the same store
            tracking_uri = _FILE_PREFIX + os.path.abspath(os.fspath(save_dir))
        self._tracking_uri = tracking_uri
        self._experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._run_name = run_name
        self._run_id = run_id
        self.tags = dict(tags) if tags else None
        self._log_model = log_model
        self._prefix = prefix
        self._artifact_location = artifact_location
        self._uploaded: dict[str, float] = {}  # checkpoint path -> its mtime when uploaded
        self._checkpoint_callback: Any = None  # log_model=True: the callback whose files finalize uploads
        self._floors: dict[str, tuple[int, int]] = {}  # after a restart: metric -> (last step, points there)
        self._client: Any = None

    # ------------------------------------------------------------------ the run
    @property
    def experiment(self) -> Any:
        """The ``mlflow.tracking.MlflowClient`` of this logger; the first call creates the experiment and run."""
        if self._client is not None and self._run_id is not None and self._experiment_id is not None:
            return self._client
        client = self._make_client()
        if self._run_id is not None:
            self._experiment_id = client.get_run(self._run_id).info.experiment_id
            return client
        if self._experiment_id is None:
            expt = client.get_experiment_by_name(self._experiment_name)
            if expt is not None and expt.lifecycle_stage != "deleted":
                self._experiment_id = expt.experiment_id
            else:
                log.info("MLflow experiment %r not found; creating it", self._experiment_name)
                self._experiment_id = client.create_experiment(name=self._experiment_name,
                                                               artifact_location=self._artifact_location)
        tags = dict(self.tags or {})
        if self._run_name is not None:
            from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

            if MLFLOW_RUN_NAME in tags:
                log.warning("MLFlowLogger: tag %s is replaced by run_name=%r", MLFLOW_RUN_NAME, self._run_name)
            tags[MLFLOW_RUN_NAME] = self._run_name
        from mlflow.tracking.context.registry import resolve_tags

        run = client.create_run(experiment_id=self._experiment_id, tags=resolve_tags(tags))
        self._run_id = run.info.run_id
        return client

    def _make_client(self) -> Any:
        if self._client is None:
            if self._tracking_uri.startswith(_FILE_PREFIX):
                # mlflow>=3 refuses the file store unless asked for; a file: URI (or save_dir) is that request
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self._tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The run's id (creates the run on first use)."""
        _ = self.experiment
        assert self._run_id is not None
        return self._run_id

    @property
    def experiment_id(self) -> str:
        """The experiment's id (creates the experiment and run on first use)."""
        _ = self.experiment
        assert self._experiment_id is not None
        return self._experiment_id

    @property
    def name(self) -> str:
        """The experiment id, as Lightning's MLFlowLogger names it."""
        return self.experiment_id

    @property
    def version(self) -> str:
        """The run id."""
        return self.run_id

    @property
    def save_dir(self) -> str | None:
        """The local store's directory for a ``file:`` tracking URI, else None."""
        if self._tracking_uri.startswith(_FILE_PREFIX):
            return self._tracking_uri[len(_FILE_PREFIX):]
        return None

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    # ------------------------------------------------------------------ logging
    def log_hyperparams(self, params: Any) -> None:
        """Flattened (``outer/inner`` keys), values as strings cut to 250 characters, as Lightning logs them."""
        from mlflow.entities import Param

        flat = helpers.flatten(helpers.as_dict(params))
        items = [Param(key=k, value=str(v)[:_PARAM_VALUE_CHARS]) for k, v in flat.items()]
        client = self.experiment
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            client.log_batch(run_id=self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One log_batch per call; after a restart, values at steps the run already holds are not sent twice."""
        from mlflow.entities import Metric

        step = int(step or 0)
        stamp = int(time.time() * 1000)
        batch = []
        for key, value in helpers.add_prefix(metrics, self._prefix).items():
            if isinstance(value, str):
                log.warning("MLFlowLogger: discarding metric with string value %s=%s", key, value)
                continue
            clean = _BAD_KEY_CHARS.sub("", key)
            if clean != key:
                log.warning("MLflow only allows '_', '/', '.', '-', ' ' and alphanumerics in metric names; "
                            "logging %r as %r", key, clean)
            if helpers.already_logged(self._floors, clean, step):
                continue  # logged before the failure this run restarted from: keep the history monotonic
            batch.append(Metric(key=clean, value=float(value), timestamp=stamp, step=step))
        if not batch:
            return
        client = self.experiment
        for i in range(0, len(batch), _METRICS_PER_BATCH):
            client.log_batch(run_id=self.run_id, metrics=batch[i:i + _METRICS_PER_BATCH])

    def resume_from_step(self, step: int) -> None:
        """Continue this run after a restart at ``step``: note the last step each metric reached before the
        failure and how often it was logged there (those points are not sent again), and mark the run RUNNING."""
        client = self.experiment
        run = client.get_run(self.run_id)
        floors = {}
        for key in run.data.metrics:
            steps = [int(m.step) for m in client.get_metric_history(self.run_id, key)]
            if steps:
                last = max(steps)
                floors[key] = (last, steps.count(last))
        self._floors = floors
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        log.debug("MLflow run %s resumes at step %d; metrics already logged up to %s", self.run_id, step, floors)

    def finalize(self, status: str = "success") -> None:
        """Upload the checkpoints left for the end (log_model=True) and set the run's status: success ->
        FINISHED, failed -> FAILED."""
        if self._run_id is None:
            return  # nothing was logged: no run to close
        if self._checkpoint_callback is not None:
            self._upload_checkpoints(self._checkpoint_callback)
        self.experiment.set_terminated(self._run_id, _STATUS.get(status, status))

    # ------------------------------------------------------------------ checkpoints
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """log_model='all' (or True with save_top_k=-1): upload now; True: remember the callback for finalize."""
        if self._log_model == "all" or (self._log_model is True and checkpoint_callback.save_top_k == -1):
            self._upload_checkpoints(checkpoint_callback)
        elif self._log_model is True:
            self._checkpoint_callback = checkpoint_callback

    def _upload_checkpoints(self, checkpoint_callback: Any) -> None:
        """Each new checkpoint under the artifact folder named for its file stem, with metadata.yaml and
        aliases.txt (``latest``, plus ``best`` for the best model), as Lightning lays them out."""
        import yaml

        client = self.experiment
        for mtime, path, score in helpers.new_checkpoints(checkpoint_callback, self._uploaded):
            folder = os.path.splitext(os.path.basename(path))[0]
            aliases = ["latest", "best"] if path == getattr(checkpoint_callback, "best_model_path", "") \
                else ["latest"]
            with helpers.local_file(path) as local:
                client.log_artifact(self.run_id, local, folder)
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "metadata.yaml"), "w") as f:
                    yaml.safe_dump(_plain(helpers.checkpoint_metadata(checkpoint_callback, path, score)), f)
                with open(os.path.join(tmp, "aliases.txt"), "w") as f:
                    f.write(str(aliases))
                client.log_artifacts(self.run_id, tmp, folder)
            self._uploaded[path] = mtime

    # ------------------------------------------------------------------ across processes
    def state_dict(self) -> dict[str, Any]:
        """The run rank 0 wrote to and the checkpoints it uploaded, for the driver's copy."""
        return {"run_id": self._run_id, "experiment_id": self._experiment_id, "uploaded": dict(self._uploaded)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run_id = state.get("run_id") or self._run_id
        self._experiment_id = state.get("experiment_id") or self._experiment_id
        self._uploaded.update(state.get("uploaded", {}))

    def __getstate__(self) -> dict[str, Any]:
        # create the run here, before the logger is copied to ranks, so every copy writes to the same run
        _ = self.experiment
        state = self.__dict__.copy()
        state["_client"] = None  # a client is rebuilt lazily where the copy lands
        state["_checkpoint_callback"] = None
        return state


def _plain(v: Any) -> Any:
    """Values yaml.safe_dump can write (tensors and other objects become numbers or text)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
