"""RunConfig: the Trainer's validated arguments, the one thing (besides module and data) a rank receives.

The Trainer builds it once from Lightning's keyword arguments; every rank rebuilds its Trainer
facade and RankSession from it, so nothing of a driver-side Trainer is ever pickled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from raytrainer.plan import Plan, as_sequence
from raytrainer.profilers import make_profiler
from raytrainer.utilities import log
from raytrainer.utilities.durations import parse_duration
from raytrainer.utilities.exceptions import MisconfigurationException


@dataclass
class RunConfig:
    """Every Trainer argument after validation and defaulting (Lightning's semantics)."""

    plan: Plan
    fast_dev_run: int = 0
    max_epochs: int | None = 1000
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time_s: float | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    limit_test_batches: int | float | None = None
    limit_predict_batches: int | float | None = None
    overfit_batches: int | float = 0.0
    val_check_interval: int | float | None = None
    val_check_time_s: float | None = None   # val_check_interval given as a duration (Lightning 2.6)
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int = 2
    log_every_n_steps: int = 50
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: bool | str | None = None
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    detect_anomaly: bool = False
    profiler: Any = None
    barebones: bool = False
    plugins: list[Any] = field(default_factory=list)
    enable_autolog_hparams: bool = True
    model_registry: str | None = None
    default_root_dir: str = "."
    enable_progress_bar: bool = True
    enable_model_summary: bool = True
    enable_checkpointing: bool = True
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    # raytrainer: Ray backend and fault tolerance
    max_failures: int = 0
    placement_timeout_s: float = 60.0
    collective_timeout_s: float = 300.0
    snapshot_every_n_steps: int | None = None
    heartbeat_timeout_s: float = 300.0
    elastic_batch_policy: str = "rank"
    scale_check_interval_s: float = 5.0
    ray_address: str | None = None
    spare_ranks_per_node: int = 0
    # set by the tuner for its private trial runs (here and on Ray ranks): no configure_callbacks() callbacks,
    # as Lightning's searches run only their own callback, and no events written to the user's log dir
    tuning_trial: bool = False

    @classmethod
    def from_args(cls, plan: Plan, *, fast_dev_run: bool | int, max_epochs: int | None, min_epochs: int | None,
                  max_steps: int, min_steps: int | None, max_time: Any, limit_train_batches: Any,
                  limit_val_batches: Any, limit_test_batches: Any, limit_predict_batches: Any,
                  overfit_batches: int | float, val_check_interval: Any, check_val_every_n_epoch: int | None,
                  num_sanity_val_steps: int | None,
                  log_every_n_steps: int | None, enable_checkpointing: bool | None, enable_progress_bar: bool | None,
                  enable_model_summary: bool | None, accumulate_grad_batches: int, gradient_clip_val: float | None,
                  gradient_clip_algorithm: str | None, deterministic: bool | str | None, benchmark: bool | None,
                  inference_mode: bool, use_distributed_sampler: bool, detect_anomaly: bool,
                  profiler: Any, barebones: bool, plugins: Any, enable_autolog_hparams: bool,
                  model_registry: str | None,
                  default_root_dir: str, sync_batchnorm: bool, reload_dataloaders_every_n_epochs: int,
                  max_failures: int, placement_timeout_s: float, collective_timeout_s: float,
                  snapshot_every_n_steps: int | None, heartbeat_timeout_s: float, elastic_batch_policy: str,
                  scale_check_interval_s: float, ray_address: str | None, spare_ranks_per_node: int | None,
                  logger: Any = None) -> tuple[RunConfig, Any]:
        """Validate Lightning's arguments; returns the config and the logger argument after fast_dev_run."""
        if barebones:
            check_barebones(enable_checkpointing=enable_checkpointing, logger=logger,
                            enable_progress_bar=enable_progress_bar, log_every_n_steps=log_every_n_steps,
                            enable_model_summary=enable_model_summary, num_sanity_val_steps=num_sanity_val_steps,
                            fast_dev_run=fast_dev_run, detect_anomaly=detect_anomaly, profiler=profiler)
            enable_checkpointing = enable_progress_bar = enable_model_summary = logger = False
            log_every_n_steps = num_sanity_val_steps = 0
        if model_registry is not None:
            raise MisconfigurationException(
                f"Trainer(model_registry={model_registry!r}) uploads checkpoints to Lightning AI's model registry "
                "(litmodels), which raytrainer does not support. Remove model_registry: ModelCheckpoint writes the "
                "checkpoints to its dirpath (a local path or a URI such as s3://bucket/run), and you can upload "
                "them from there with your registry's client.")
        fdr = int(fast_dev_run) if not isinstance(fast_dev_run, bool) else (1 if fast_dev_run else 0)
        if fdr < 0:
            raise MisconfigurationException(f"fast_dev_run={fast_dev_run!r} must be a bool or a non-negative int.")
        if not isinstance(max_steps, int) or max_steps < -1:
            raise MisconfigurationException(f"max_steps={max_steps!r} must be -1 (no limit) or a non-negative int.")
        check_int("max_epochs", max_epochs, -1, "-1 (no limit), a non-negative int, or None (1000 epochs)")
        check_int("min_epochs", min_epochs, 0, "a non-negative int or None")
        check_int("min_steps", min_steps, 0, "a non-negative int or None")
        check_int("num_sanity_val_steps", num_sanity_val_steps, -1, "-1 (every validation batch), an int >= 0 or "
                  "None (2)")
        check_int("log_every_n_steps", log_every_n_steps, 0, "an int >= 1, or None (50)")
        if not isinstance(accumulate_grad_batches, int) or accumulate_grad_batches < 1:
            raise MisconfigurationException(f"accumulate_grad_batches={accumulate_grad_batches!r} must be an int >= 1.")
        if gradient_clip_algorithm not in (None, "norm", "value"):
            raise MisconfigurationException(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'.")
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise MisconfigurationException(f"gradient_clip_val={gradient_clip_val!r} must be >= 0.")
        if max_failures < 0:
            raise MisconfigurationException(f"max_failures={max_failures!r} must be >= 0.")
        if sync_batchnorm and plan.accelerator != "cuda":
            raise MisconfigurationException(
                f"sync_batchnorm=True needs CUDA devices, but this run is on {plan.accelerator}: torch's "
                "SyncBatchNorm synchronises batch statistics only between GPUs. Remove sync_batchnorm "
                "(each rank then normalises with its own batch's statistics), or train on GPUs "
                "(accelerator='gpu', devices=N).")
        if fdr:
            max_epochs, max_steps, num_sanity_val_steps = 1, fdr, 0
            logger, enable_checkpointing = False, False
        data = data_schedule(fdr, overfit_batches, limit_train_batches, limit_val_batches, limit_test_batches,
                             limit_predict_batches, val_check_interval, check_val_every_n_epoch,
                             reload_dataloaders_every_n_epochs)
        log_every = 50 if log_every_n_steps is None else int(log_every_n_steps)
        if log_every < 1 and not barebones:  # barebones: 0, no step logging (Lightning's value)
            raise MisconfigurationException(f"log_every_n_steps={log_every_n_steps!r} must be >= 1.")
        if snapshot_every_n_steps is not None and snapshot_every_n_steps < 0:
            raise MisconfigurationException(
                f"snapshot_every_n_steps={snapshot_every_n_steps!r}: use an int >= 1, 0 to turn "
                "in-memory snapshots off, or None to snapshot every step while that costs under 5% "
                "of the step time.")
        if spare_ranks_per_node is not None and (not isinstance(spare_ranks_per_node, int)
                                                 or isinstance(spare_ranks_per_node, bool) or spare_ranks_per_node < 0):
            raise MisconfigurationException(
                f"spare_ranks_per_node={spare_ranks_per_node!r}: use an int >= 0 (warm spare processes "
                "per node that replace a dead rank at once), or None for 1 when max_failures > 0.")
        for name, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                            ("scale_check_interval_s", scale_check_interval_s),
                            ("placement_timeout_s", placement_timeout_s),
                            ("collective_timeout_s", collective_timeout_s)):
            if not value > 0:
                raise MisconfigurationException(f"{name}={value!r} must be > 0 seconds.")
        if elastic_batch_policy not in ("rank", "global"):
            raise MisconfigurationException(
                f"elastic_batch_policy={elastic_batch_policy!r}: use 'rank' (keep each rank's batch "
                "size; the global batch follows the world size) or 'global' (keep the global batch; "
                "each rank's batch is batch_size * MAX / world).")
        config = cls(
            plan=plan, fast_dev_run=fdr,
            max_epochs=max_epochs if max_epochs is not None else (1000 if max_steps == -1 and max_time is None
                                                                  else -1),
            min_epochs=min_epochs, max_steps=max_steps, min_steps=min_steps, max_time_s=parse_max_time(max_time),
            **data,
            num_sanity_val_steps=2 if num_sanity_val_steps is None else int(num_sanity_val_steps),
            log_every_n_steps=log_every, accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm,
            deterministic=deterministic, benchmark=benchmark, inference_mode=bool(inference_mode),
            use_distributed_sampler=use_distributed_sampler, detect_anomaly=detect_anomaly,
            profiler=make_profiler(profiler), barebones=bool(barebones),
            plugins=list(as_sequence(plugins)), enable_autolog_hparams=bool(enable_autolog_hparams),
            model_registry=model_registry,
            default_root_dir=str(default_root_dir),
            enable_progress_bar=True if enable_progress_bar is None else bool(enable_progress_bar),
            enable_model_summary=True if enable_model_summary is None else bool(enable_model_summary),
            enable_checkpointing=True if enable_checkpointing is None else bool(enable_checkpointing),
            sync_batchnorm=sync_batchnorm,
            max_failures=max_failures, placement_timeout_s=float(placement_timeout_s),
            collective_timeout_s=float(collective_timeout_s), snapshot_every_n_steps=snapshot_every_n_steps,
            heartbeat_timeout_s=float(heartbeat_timeout_s), elastic_batch_policy=elastic_batch_policy,
            scale_check_interval_s=float(scale_check_interval_s), ray_address=ray_address,
            spare_ranks_per_node=(1 if max_failures > 0 else 0) if spare_ranks_per_node is None
            else spare_ranks_per_node,
        )
        return config, logger

    def limit_for(self, stage: str) -> int | float | None:
        """limit_{train,val,test,predict}_batches for a stage name ("train", "validate", "test", "predict")."""
        return {"train": self.limit_train_batches, "validate": self.limit_val_batches,
                "test": self.limit_test_batches, "predict": self.limit_predict_batches}[stage]


def check_int(name: str, value: Any, lowest: int, what: str) -> None:
    """Refuse anything but None or an int >= ``lowest`` (a bool, a float or a string such as "3" included), before
    any work starts: a wrong type would otherwise fail in the middle of a run."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise MisconfigurationException(f"{name}={value!r} ({type(value).__name__}): use {what}.")


def check_limit(name: str, value: Any) -> Any:
    """A limit_*_batches value: None, a fraction in [0, 1], or a batch count >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
            (isinstance(value, float) and value > 1.0):
        raise MisconfigurationException(
            f"{name}={value!r}: use a float in [0.0, 1.0] (fraction) or an int >= 0 (batches).")
    return value


def parse_max_time(value: Any) -> float | None:
    """max_time as seconds: 'DD:HH:MM:SS', a timedelta or a dict of timedelta arguments."""
    return parse_duration("max_time", value)


def _info_if_one(name: str, value: Any) -> None:
    """Lightning's note when a batch argument is 1 or 1.0: the int and float read very differently."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and value == 1:
        what = {"limit_train_batches": "1 batch per epoch will be used.",
                "val_check_interval": "validation will run after every batch."}.get(name, "1 batch will be used.")
        log.info("`Trainer(%s=1)` was configured so %s", name, what)
    elif isinstance(value, float) and value == 1.0:
        what = {"limit_train_batches": "100% of the batches per epoch will be used",
                "val_check_interval": "validation will run at the end of the training epoch"}.get(
                    name, "100% of the batches will be used")
        log.info("`Trainer(%s=1.0)` was configured so %s.", name, what)


def _duration_s(name: str, value: Any) -> float:
    """A duration given as 'DD:HH:MM:SS', a timedelta or a dict of timedelta arguments, in seconds (> 0)."""
    try:
        seconds = parse_max_time(value)
    except (ValueError, TypeError):
        raise MisconfigurationException(f"{name}={value!r}: a duration must be 'DD:HH:MM:SS' (integers), a "
                                        "datetime.timedelta, or a dict of timedelta arguments like "
                                        "{'minutes': 10}.") from None
    if seconds is None or seconds <= 0:
        raise MisconfigurationException(f"{name}={value!r} must be a positive duration.")
    return seconds


def data_schedule(fdr: int, overfit_batches: Any, limit_train: Any, limit_val: Any, limit_test: Any,
                  limit_predict: Any, val_check_interval: Any, check_val_every_n_epoch: Any,
                  reload_every: Any) -> dict[str, Any]:
    """Lightning's rules for the batch limits, overfit_batches, fast_dev_run and the validation schedule.

    Returns the RunConfig fields they set; logs Lightning's notes for values of 1 and for fast_dev_run."""
    if isinstance(overfit_batches, bool) or not isinstance(overfit_batches, (int, float)) or overfit_batches < 0 \
            or (overfit_batches > 1 and overfit_batches % 1 != 0):
        raise MisconfigurationException(f"overfit_batches={overfit_batches!r}: use a float in [0.0, 1.0] (a fraction "
                                        "of the training batches) or an int >= 0 (a number of batches).")
    if isinstance(overfit_batches, float) and overfit_batches > 1:
        overfit_batches = int(overfit_batches)
    _info_if_one("overfit_batches", overfit_batches)
    if check_val_every_n_epoch is not None and (isinstance(check_val_every_n_epoch, bool)
                                                 or not isinstance(check_val_every_n_epoch, int)
                                                 or check_val_every_n_epoch < 1):
        raise MisconfigurationException(f"check_val_every_n_epoch={check_val_every_n_epoch!r} must be an int >= 1, "
                                        "or None (validate every val_check_interval batches, across epochs).")
    if isinstance(reload_every, bool) or not isinstance(reload_every, int) or reload_every < 0:
        raise MisconfigurationException(f"reload_dataloaders_every_n_epochs={reload_every!r} should be an int >= 0 "
                                        "(0: load the dataloaders once).")
    time_s = None
    if isinstance(val_check_interval, (str, timedelta, dict)):
        time_s = _duration_s("val_check_interval", val_check_interval)
    elif val_check_interval is not None:
        if isinstance(val_check_interval, bool) or not isinstance(val_check_interval, (int, float)) \
                or val_check_interval <= 0 or (val_check_interval > 1 and val_check_interval % 1 != 0):
            raise MisconfigurationException(
                f"val_check_interval={val_check_interval!r}: use a float in (0, 1] (fraction of an epoch), an int "
                ">= 1 (number of training batches), or a duration ('DD:HH:MM:SS', a timedelta or a dict).")
        if isinstance(val_check_interval, float) and val_check_interval > 1:
            val_check_interval = int(val_check_interval)
        if check_val_every_n_epoch is None and isinstance(val_check_interval, float):
            raise MisconfigurationException(
                f"val_check_interval={val_check_interval!r} is a fraction of an epoch, but check_val_every_n_epoch="
                "None counts batches across epochs: give an int number of training batches or a duration "
                "('DD:HH:MM:SS', a timedelta or a dict), or set check_val_every_n_epoch.")
    limits = {"limit_train_batches": limit_train, "limit_val_batches": limit_val,
              "limit_test_batches": limit_test, "limit_predict_batches": limit_predict}
    limits = {name: check_limit(name, value) for name, value in limits.items()}
    if fdr:
        log.info("Running in `fast_dev_run` mode: will run the requested loop using %d batch(es). Logging and "
                 "checkpointing is suppressed.", fdr)
        limits = {name: fdr for name in limits}
        val_check_interval, time_s, check_val_every_n_epoch = 1.0, None, 1
    else:
        for name, value in limits.items():
            if not (overfit_batches > 0 and name in ("limit_train_batches", "limit_val_batches")):
                _info_if_one(name, value)
        if time_s is None:
            _info_if_one("val_check_interval", val_check_interval)
    if overfit_batches > 0:
        limits["limit_train_batches"] = limits["limit_val_batches"] = overfit_batches
    return {**limits, "overfit_batches": overfit_batches, "val_check_interval": val_check_interval,
            "val_check_time_s": time_s, "check_val_every_n_epoch": check_val_every_n_epoch,
            "reload_dataloaders_every_n_epochs": reload_every}


BAREBONES_OFF = (
    ("enable_checkpointing", "Checkpointing"), ("logger", "Logging"), ("enable_progress_bar", "The progress bar"),
    ("log_every_n_steps", "Logging"), ("enable_model_summary", "The model summary"),
    ("num_sanity_val_steps", "Sanity checking"), ("fast_dev_run", "A development run"),
    ("detect_anomaly", "Anomaly detection"), ("profiler", "Profiling"))


def check_barebones(**given: Any) -> None:
    """Trainer(barebones=True) turns off everything that costs speed; refuse an argument that turns one back on
    (Lightning's rule: None, False and 0 are accepted, any other value is refused)."""
    for name, what in BAREBONES_OFF:
        value = given[name]
        if value is None or (name != "profiler" and (value is False or (value == 0 and value is not True))):
            continue
        raise MisconfigurationException(
            f"`Trainer(barebones=True, {name}={value!r})` was passed. {what} costs speed, so barebones mode turns it "
            f"off: drop {name}=..., or drop barebones=True to use it.")
    log.info("Trainer(barebones=True): checkpointing, the progress bar, the model summary, logging (loggers, "
             "log_every_n_steps, self.log), sanity checking, fast_dev_run, anomaly detection and profiling are off, "
             "so the run measures the Trainer's own overhead.")
