"""LoopState and RunConfig without a Trainer: what checkpoints, snapshots and resizes save."""
from __future__ import annotations

import pytest
import torch

from raytrainer.core.config import RunConfig, check_limit, parse_max_time
from raytrainer.core.state import LoopState
from raytrainer.plan import Plan


def test_state_dict_at_epoch_end_points_at_the_next_epoch():
    state = LoopState()
    state.current_epoch, state.batches_done_in_epoch, state.epoch_done = 3, 5, True
    sd = state.state_dict(results={"x": 1})
    assert sd["epoch"] == 4 and sd["batch_idx"] == 0 and sd["results"] == {}  # no partial means at a boundary


def test_state_dict_mid_epoch_keeps_batches_segments_and_partial_means():
    state = LoopState()
    state.current_epoch, state.batches_done_in_epoch = 1, 7
    rng = torch.get_rng_state()
    state.epoch_start_rng = rng
    sd = state.state_dict(segments=[[2, 3, 8]], results={"loss": {"total": 2.0}})
    assert (sd["epoch"], sd["batch_idx"], sd["segments"]) == (1, 7, [[2, 3, 8]])
    assert torch.equal(sd["epoch_start_rng"], rng) and sd["results"] == {"loss": {"total": 2.0}}


def test_load_state_dict_sets_counters_and_one_resume_position():
    state = LoopState()
    state.load_state_dict({"epoch": 2, "batch_idx": 4, "epoch_start_rng": None, "segments": None,
                           "batches_that_stepped": 30, "total_batches_seen": 44, "results": None},
                          global_step=30, rng=None)
    assert (state.current_epoch, state.global_step, state.total_batches_seen) == (2, 30, 44)
    assert state.resuming and state.take_resume(1) is None
    assert state.take_resume(2).batch_idx == 4 and state.take_resume(2) is None


def test_counters_round_trip():
    a = LoopState()
    a.current_epoch, a.global_step, a.batches_that_stepped, a.total_batches_seen = 3, 40, 41, 52
    b = LoopState()
    b.load_counters(a.counters())
    assert b.counters() == a.counters()


def _config(**overrides):
    args = dict(fast_dev_run=False, max_epochs=None, min_epochs=None, max_steps=-1, min_steps=None, max_time=None,
                limit_train_batches=None, limit_val_batches=None, limit_test_batches=None,
                limit_predict_batches=None, val_check_interval=None, check_val_every_n_epoch=1,
                num_sanity_val_steps=None, log_every_n_steps=None, enable_checkpointing=None,
                enable_progress_bar=None, enable_model_summary=None, accumulate_grad_batches=1,
                gradient_clip_val=None, gradient_clip_algorithm=None, deterministic=None, benchmark=None,
                inference_mode=True, use_distributed_sampler=True, detect_anomaly=False, default_root_dir=".",
                sync_batchnorm=False, reload_dataloaders_every_n_epochs=0, max_failures=0,
                placement_timeout_s=60.0, collective_timeout_s=300.0, snapshot_every_n_steps=None,
                heartbeat_timeout_s=300.0, elastic_batch_policy="rank", scale_check_interval_s=5.0,
                ray_address=None, spare_ranks_per_node=None, overfit_batches=0.0, profiler=None, barebones=False,
                plugins=None, enable_autolog_hparams=True, model_registry=None)
    args.update(overrides)
    return RunConfig.from_args(Plan.from_args(), **args)


def test_run_config_defaults_as_lightning():
    config, logger = _config()
    assert config.max_epochs == 1000 and config.log_every_n_steps == 50 and config.num_sanity_val_steps == 2
    assert config.enable_checkpointing and config.spare_ranks_per_node == 0 and logger is None


def test_fast_dev_run_overrides_limits_and_turns_the_logger_off():
    config, logger = _config(fast_dev_run=3, logger=None)
    assert (config.max_epochs, config.max_steps, config.limit_val_batches, config.num_sanity_val_steps) == (1, 3, 3, 0)
    assert logger is False and not config.enable_checkpointing


def test_run_config_refuses_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="accumulate_grad_batches=0 must be an int >= 1"):
        _config(accumulate_grad_batches=0)
    with pytest.raises(ValueError, match="elastic_batch_policy='x'"):
        _config(elastic_batch_policy="x")
    with pytest.raises(ValueError, match="limit_val_batches=1.5"):
        check_limit("limit_val_batches", 1.5)
    assert parse_max_time("00:01:00:00") == 3600.0
