"""The checkpoint format as pure layout: parts in, Lightning's dict out, and back, with no Trainer."""
from __future__ import annotations

import pytest
import torch

from raytrainer.checkpoint import format as fmt
from raytrainer.core.state import LoopState


def _training(position: dict, world_size: int = 1) -> fmt.TrainingParts:
    return fmt.TrainingParts(callbacks={"Cb": {"k": 1}}, optimizer_states=[{"state": {}, "param_groups": []}],
                             lr_schedulers=[{"last_epoch": 3}], scaler=None, rng={"torch": torch.get_rng_state()},
                             position=position, world_size=world_size, pending_plateau={"0": 0.5})


def _mid_epoch_state() -> LoopState:
    state = LoopState()
    state.current_epoch, state.global_step = 2, 23
    state.batches_done_in_epoch, state.total_batches_seen, state.batches_that_stepped = 3, 23, 23
    state.epoch_start_rng = torch.get_rng_state()
    return state


def test_build_writes_lightning_keys_and_ours():
    state = _mid_epoch_state()
    position = {**state.state_dict(segments=None, results={"loss": {"total": 1.0}}), "sampler_seed": 7}
    ckpt = fmt.build(progress=fmt.Progress(current_epoch=2, global_step=23, batches_done_in_epoch=3,
                                           total_batches_seen=23, batches_that_stepped=23),
                     state_dict={"w": torch.ones(2)}, hparams_name="kwargs", hyper_parameters={"lr": 0.1},
                     training=_training(position), datamodule=("DM", {"bs": 4}, {"seen": 3}))
    assert set(fmt.FORMAT_KEYS) <= set(ckpt)
    assert (ckpt["epoch"], ckpt["global_step"]) == (2, 23)
    ours = ckpt["raytrainer"]
    assert ours["position"]["batch_idx"] == 3 and ours["position"]["sampler_seed"] == 7
    assert ours["batches_that_stepped"] == 23 and ours["results"] == {"loss": {"total": 1.0}}
    assert ckpt["DM"] == {"seen": 3} and ckpt["datamodule_hyper_parameters"] == {"bs": 4}
    fmt.check_loadable(ckpt)


def test_weights_only_build_has_no_training_state():
    ckpt = fmt.build(progress=fmt.Progress(), state_dict={}, hparams_name=None, hyper_parameters={})
    assert "optimizer_states" not in ckpt and "raytrainer" not in ckpt and "callbacks" not in ckpt


@pytest.mark.parametrize("mid,epoch_done,expected_started,expected_processed", [
    (True, False, 3, 2),    # inside epoch 2: started, not processed
    (False, True, 3, 3),    # at epoch 2's end: processed, not yet completed
    (False, False, 2, 2),   # between epochs: two epochs done
])
def test_lightning_loops_epoch_progress(mid, epoch_done, expected_started, expected_processed):
    p = fmt.Progress(current_epoch=2, global_step=20, batches_done_in_epoch=4 if (mid or epoch_done) else 0,
                     total_batches_seen=20, batches_that_stepped=20, epoch_done=epoch_done,
                     schedulers=[("step", 2), ("epoch", 1)])
    loops = fmt.lightning_loops(p)
    ep = loops["fit_loop"]["epoch_progress"]["current"]
    assert (ep["started"], ep["processed"]) == (expected_started, expected_processed)
    assert loops["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"] is epoch_done
    # the position Lightning would resume at is what we wrote
    epoch, batch_idx, _ = fmt.lightning_position({"loops": loops, "epoch": 2})
    assert epoch == (3 if epoch_done else 2) and batch_idx == (4 if mid else 0)


def test_read_position_round_trips_loop_state():
    state = _mid_epoch_state()
    ckpt = fmt.build(progress=fmt.Progress(current_epoch=2, global_step=23), state_dict={}, hparams_name=None,
                     hyper_parameters={}, training=_training({**state.state_dict(), "sampler_seed": None}))
    pos = fmt.read_position(ckpt, world_size=1, where="mem")
    restored = LoopState()
    restored.load_state_dict(pos.loop_state, global_step=ckpt["global_step"], rng=pos.rng)
    assert (restored.current_epoch, restored.global_step, restored.batches_that_stepped) == (2, 23, 23)
    resume = restored.take_resume(2)
    assert resume is not None and resume.batch_idx == 3 and torch.equal(resume.epoch_rng, state.epoch_start_rng)
    assert restored.take_resume(2) is None  # used once
    assert pos.pending_plateau == {"0": 0.5}


def test_read_position_rescales_for_another_world_size():
    state = _mid_epoch_state()
    ckpt = fmt.build(progress=fmt.Progress(), state_dict={}, hparams_name=None, hyper_parameters={},
                     training=_training({**state.state_dict(), "sampler_seed": None}, world_size=2))
    pos = fmt.read_position(ckpt, world_size=4, where="mem")
    assert pos.loop_state["batch_idx"] == 1 and pos.rng is None and pos.loop_state["epoch_start_rng"] is None


def test_read_position_of_a_lightning_checkpoint_has_no_rng():
    loops = fmt.lightning_loops(fmt.Progress(current_epoch=1, global_step=8, batches_done_in_epoch=3,
                                             total_batches_seen=8, batches_that_stepped=8))
    pos = fmt.read_position({"loops": loops, "epoch": 1, "global_step": 8}, world_size=1, where="pl")
    assert pos.rng is None and pos.loop_state["epoch"] == 1 and pos.loop_state["batch_idx"] == 3
    assert pos.loop_state["total_batches_seen"] == 8


def test_scaler_state_reads_ours_and_lightnings_keys():
    assert fmt.scaler_state({"MixedPrecision": {"scale": 2.0}}) == {"scale": 2.0}
    assert fmt.scaler_state({"native_amp_scaling_state": {"scale": 4.0}}) == {"scale": 4.0}
    assert fmt.scaler_state({"raytrainer": {"grad_scaler": {"scale": 8.0}}, "MixedPrecision": {"x": 1}}) \
        == {"scale": 8.0}


def test_check_loadable_names_the_key():
    with pytest.raises(TypeError, match=r"\['callbacks'\]\['Cb'\]\['obj'\] is a builtins.object"):
        fmt.check_loadable({"callbacks": {"Cb": {"obj": object()}}})
