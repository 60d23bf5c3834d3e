"""Plan.from_args: every Lightning 1.x / 2.x device argument form, resolved with no hardware."""
from __future__ import annotations

import pytest
import torch

import raytrainer as pl
from raytrainer.plan import Env, Plan

NO_GPU = Env(cuda_device_count=0)
EIGHT_GPUS = Env(cuda_device_count=8)


def plan(env: Env = NO_GPU, **kwargs) -> Plan:
    return Plan.from_args(env=env, **kwargs)


# ------------------------------------------------------------------------------ Lightning 1.x forms
def test_defaults_on_a_cpu_machine_run_one_rank_in_process():
    p = plan()
    assert (p.accelerator, p.world_size, p.num_nodes, p.ranks_per_node) == ("cpu", 1, 1, 1)
    assert p.device_ids is None
    assert p.precision == "32-true"
    assert p.launcher == "in_process"
    assert not p.elastic
    assert p.requested == {}


def test_defaults_on_a_gpu_machine_pick_one_gpu():
    p = plan(EIGHT_GPUS)
    assert (p.accelerator, p.device_ids, p.world_size, p.launcher) == ("cuda", (0,), 1, "in_process")


def test_num_processes_8_is_eight_cpu_ranks_on_ray():
    p = plan(num_processes=8)
    assert (p.accelerator, p.ranks_per_node, p.num_nodes, p.world_size) == ("cpu", 8, 1, 8)
    assert p.launcher == "ray"
    assert p.requested == {"num_processes": 8}


def test_num_processes_8_on_128_nodes_is_1024_ranks():
    p = plan(num_processes=8, num_nodes=128)
    assert (p.ranks_per_node, p.num_nodes, p.world_size) == (8, 128, 1024)
    assert (p.min_ranks, p.max_ranks) == (1024, 1024)
    assert p.launcher == "ray"
    assert "1024 rank(s)" in p.describe() and "128 node(s) x 8" in p.describe()


def test_gpus_1_is_one_cuda_device_in_process():
    p = plan(EIGHT_GPUS, gpus=1)
    assert (p.accelerator, p.device_ids, p.world_size, p.launcher) == ("cuda", (0,), 1, "in_process")
    assert p.requested == {"gpus": 1}


def test_gpus_4_on_8_nodes_is_32_ranks():
    p = plan(EIGHT_GPUS, gpus=4, num_nodes=8)
    assert (p.accelerator, p.ranks_per_node, p.num_nodes, p.world_size) == ("cuda", 4, 8, 32)
    assert p.device_ids == (0, 1, 2, 3)
    assert p.launcher == "ray"


def test_gpus_list_keeps_exactly_those_ids():
    p = plan(EIGHT_GPUS, gpus=[1, 3, 5])
    assert p.device_ids == (1, 3, 5)
    assert p.ranks_per_node == 3 and p.world_size == 3


@pytest.mark.parametrize("gpus, ids", [("1,3", (1, 3)), ("1,", (1,)), (" 0, 2 ", (0, 2)), ("2", (0, 1)),
                                       ([4], (4,))])
def test_gpus_strings_follow_lightning_1x_parsing(gpus, ids):
    p = plan(EIGHT_GPUS, gpus=gpus)
    assert p.device_ids == ids
    assert p.world_size == len(ids)


@pytest.mark.parametrize("gpus", [-1, "-1"])
def test_gpus_minus_one_takes_every_visible_gpu(gpus):
    assert plan(Env(cuda_device_count=3), gpus=gpus).device_ids == (0, 1, 2)
    assert plan(EIGHT_GPUS, gpus=gpus).world_size == 8


def test_gpus_minus_one_without_gpus_is_a_clear_error():
    with pytest.raises(ValueError, match=r"gpus=-1 asks for every GPU but none is visible"):
        plan(NO_GPU, gpus=-1)


@pytest.mark.parametrize("gpus", [0, "0", []])
def test_gpus_zero_means_cpu_as_in_lightning_1x(gpus):
    p = plan(EIGHT_GPUS, gpus=gpus)
    assert p.accelerator == "cpu" and p.device_ids is None and p.world_size == 1


def test_gpus_2_with_precision_16_is_fp16_mixed_on_two_gpus():
    p = plan(EIGHT_GPUS, gpus=2, precision=16)
    assert (p.accelerator, p.device_ids, p.precision, p.world_size) == ("cuda", (0, 1), "16-mixed", 2)


def test_tpu_cores_8_uses_the_xla_launcher():
    p = plan(tpu_cores=8)
    assert (p.accelerator, p.ranks_per_node, p.world_size, p.launcher) == ("tpu", 8, 8, "xla")
    assert p.device_ids is None


def test_tpu_cores_list_selects_one_core():
    p = plan(tpu_cores=[5])
    assert (p.device_ids, p.world_size) == ((5,), 1)
    with pytest.raises(ValueError, match="selects one core"):
        plan(tpu_cores=[1, 2])


# ------------------------------------------------------------------------------ Lightning 2.x forms
@pytest.mark.parametrize("kwargs, expected", [
    (dict(accelerator="cpu", devices=4), ("cpu", None, 4, "ray")),
    (dict(accelerator="cpu", devices="2"), ("cpu", None, 2, "ray")),
    (dict(accelerator="cpu", devices=1), ("cpu", None, 1, "in_process")),
    (dict(accelerator="gpu", devices=2), ("cuda", (0, 1), 2, "ray")),
    (dict(accelerator="cuda", devices=[0, 2]), ("cuda", (0, 2), 2, "ray")),
    (dict(accelerator="gpu", devices="1,3"), ("cuda", (1, 3), 2, "ray")),
    (dict(accelerator="gpu", devices=-1), ("cuda", tuple(range(8)), 8, "ray")),
    (dict(accelerator="auto", devices="auto"), ("cuda", (0,), 1, "in_process")),
    (dict(accelerator="tpu", devices=8), ("tpu", None, 8, "xla")),
    (dict(accelerator="cpu", strategy="ray"), ("cpu", None, 1, "ray")),
    (dict(accelerator="cpu", devices=2, strategy="ddp"), ("cpu", None, 2, "ray")),
])
def test_devices_and_accelerator(kwargs, expected):
    p = plan(EIGHT_GPUS, **kwargs)
    assert (p.accelerator, p.device_ids, p.world_size, p.launcher) == expected


@pytest.mark.parametrize("precision, resolved", [
    (32, "32-true"), ("32", "32-true"), ("32-true", "32-true"), (32.0, "32-true"),
    (16, "16-mixed"), ("16", "16-mixed"), ("16-mixed", "16-mixed"),
    ("bf16", "bf16-mixed"), ("bf16-mixed", "bf16-mixed"),
    ("16-true", "16-true"), ("bf16-true", "bf16-true"), (64, "64-true"), ("64", "64-true"), ("64-true", "64-true"),
])
def test_precision_aliases(precision, resolved):
    assert plan(EIGHT_GPUS, precision=precision).precision == resolved


@pytest.mark.parametrize("precision", ["8-mixed", "half", "64-mixed"])
def test_unknown_precision_lists_the_accepted_ones(precision):
    with pytest.raises(ValueError, match=r"is not supported\. Use one of 32 / '32-true'"):
        plan(precision=precision)


# ------------------------------------------------------------------------------ elastic ranges
@pytest.mark.parametrize("devices", ["2:4", (2, 4)])
def test_elastic_rank_range_on_one_node(devices):
    p = plan(accelerator="cpu", devices=devices)
    assert (p.min_ranks, p.max_ranks, p.world_size, p.ranks_per_node) == (2, 4, 4, 4)
    assert p.elastic and not p.nodes_elastic
    assert p.launcher == "ray"
    assert "elastic 2:4" in p.describe()


@pytest.mark.parametrize("num_nodes", ["1:3", (1, 3)])
def test_elastic_node_range_counts_whole_nodes(num_nodes):
    p = plan(num_processes=2, num_nodes=num_nodes)
    assert (p.min_ranks, p.max_ranks, p.num_nodes, p.ranks_per_node) == (2, 6, 3, 2)
    assert p.elastic and p.nodes_elastic
    assert p.launcher == "ray"


def test_gpu_range_is_elastic_without_fixed_ids():
    p = plan(EIGHT_GPUS, gpus="1:4")
    assert (p.accelerator, p.min_ranks, p.max_ranks, p.device_ids) == ("cuda", 1, 4, None)


def test_degenerate_range_is_a_plain_count():
    p = plan(accelerator="cpu", devices="3:3")
    assert (p.min_ranks, p.max_ranks) == (3, 3) and not p.elastic


@pytest.mark.parametrize("kwargs, message", [
    (dict(devices="4:2", accelerator="cpu"), r"need 1 <= MIN <= MAX"),
    (dict(devices="0:2", accelerator="cpu"), r"need 1 <= MIN <= MAX"),
    (dict(devices="a:b", accelerator="cpu"), r"a range must look like 'MIN:MAX'"),
    (dict(devices="2:4", num_nodes=2, accelerator="cpu"), r"cannot be combined with num_nodes=2"),
    (dict(devices="2:4", num_nodes="1:2", accelerator="cpu"), r"both elastic"),
    (dict(tpu_cores=8, num_nodes=2), r"TPU runs use torch_xla's own launcher"),
    (dict(accelerator="tpu", devices="2:4"), r"TPU runs"),
])
def test_bad_ranges(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(**kwargs)


# ------------------------------------------------------------------------------ conflicts and bad values
@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=1, tpu_cores=8), r"gpus=1 and tpu_cores=8 conflict"),
    (dict(gpus=2, num_processes=2), r"conflict"),
    (dict(gpus=1, devices=2), r"gpus=1 and devices=2 both set the device count"),
    (dict(num_processes=2, devices=2), r"both set the device count"),
    (dict(accelerator="cpu", gpus=1), r"gpus=1 conflicts with accelerator='cpu'"),
    (dict(accelerator="gpu", tpu_cores=8), r"conflicts with accelerator='gpu'"),
    (dict(accelerator="gpu", num_processes=2), r"num_processes=2 means CPU processes"),
    (dict(strategy="xla", accelerator="cpu"), r"strategy='xla' needs accelerator='tpu'"),
    (dict(strategy="horovod"), r"strategy='horovod' is not known"),
    (dict(accelerator="mps"), r"accelerator='mps' is not known"),
    (dict(accelerator="cpu", devices=0), r"devices=0 must be at least 1"),
    (dict(num_nodes=0), r"num_nodes=0 must be at least 1"),
    (dict(accelerator="cpu", devices="many"), r"devices='many' must be a positive integer"),
    (dict(gpus=[1, 1]), r"distinct non-negative"),
    (dict(gpus="x"), r"gpus='x': expected an int"),
])
def test_conflicting_or_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(EIGHT_GPUS, **kwargs)


# ------------------------------------------------------------------------------ hardware checks
def test_gpus_1_without_cuda_names_what_was_asked_and_what_is_missing():
    p = plan(NO_GPU, gpus=1)
    with pytest.raises(RuntimeError, match=r"^gpus=1 asks for CUDA but torch\.cuda\.is_available\(\) is False"):
        p.check_hardware(NO_GPU)


def test_gpu_ids_beyond_the_visible_gpus():
    p = plan(EIGHT_GPUS, gpus=[1, 3, 5])
    with pytest.raises(RuntimeError, match=r"asks for CUDA device\(s\) \[3, 5\] but only 2 GPU\(s\) are visible"):
        p.check_hardware(Env(cuda_device_count=2))
    p.check_hardware(EIGHT_GPUS)  # enough GPUs: no error


def test_multi_node_gpu_ids_are_checked_on_the_nodes_not_here():
    p = plan(EIGHT_GPUS, gpus=4, num_nodes=8)
    p.check_hardware(Env(cuda_device_count=1))  # the driver may have fewer GPUs than each worker node


def test_tpu_without_torch_xla_names_the_extra_to_install():
    p = plan(tpu_cores=8)
    with pytest.raises(RuntimeError, match=r'tpu_cores=8 asks for TPU cores.*pip install "raytrainer\[tpu\]"'):
        p.check_hardware(Env(xla_installed=False))
    p.check_hardware(Env(xla_installed=True))


def test_fp16_on_cpu_points_to_bf16():
    p = plan(precision=16)
    with pytest.raises(ValueError, match=r"needs a CUDA GPU.*bf16-mixed"):
        p.check_hardware(NO_GPU)


def test_env_detect_matches_torch():
    env = Env.detect()
    assert env.cuda_device_count == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


# ------------------------------------------------------------------------------ through the Trainer
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_trainer_gpus_1_fails_before_any_work():
    with pytest.raises(RuntimeError, match=r"gpus=1 asks for CUDA but torch\.cuda\.is_available\(\) is False"):
        pl.Trainer(gpus=1)


def test_trainer_tpu_without_torch_xla():
    if Env.detect().xla_installed:
        pytest.skip("torch_xla is installed here")
    with pytest.raises(RuntimeError, match=r'pip install "raytrainer\[tpu\]"'):
        pl.Trainer(tpu_cores=8)


@pytest.mark.parametrize("typo, suggestion", [("max_epoch", "max_epochs"), ("gpu", "gpus"),
                                              ("lmit_train_batches", "limit_train_batches"),
                                              ("acumulate_grad_batches", "accumulate_grad_batches")])
def test_unknown_trainer_argument_suggests_the_closest_name(typo, suggestion):
    with pytest.raises(TypeError, match=rf"unknown argument\(s\) '{typo}' \(did you mean '{suggestion}'\?\)"):
        pl.Trainer(**{typo: 1})


def test_unknown_trainer_argument_with_no_close_match_lists_valid_ones():
    with pytest.raises(TypeError, match=r"'zzz'\. Valid arguments: accelerator, strategy, devices"):
        pl.Trainer(zzz=1)


def test_trainer_conflict_is_a_value_error():
    with pytest.raises(ValueError, match="conflict"):
        pl.Trainer(gpus=1, tpu_cores=8)


def test_trainer_device_attributes_on_cpu():
    t = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert t.plan.accelerator == "cpu" and t.plan.launcher == "in_process"
    assert (t.world_size, t.global_rank, t.local_rank, t.node_rank) == (1, 0, 0, 0)
    assert t.is_global_zero
    assert (t.num_devices, t.num_nodes, t.precision) == (1, 1, "32-true")
    t2 = pl.Trainer(num_processes=4, num_nodes=2, logger=False, enable_checkpointing=False)
    assert (t2.world_size, t2.num_devices, t2.num_nodes) == (8, 4, 2)
    assert pl.Trainer(accelerator="cpu", precision="bf16", logger=False).precision == "bf16-mixed"
