"""The cluster configs in cluster/: Ray's own validation, and the promises cluster/README.md makes.

`ray up` prepares a config (defaults for the provider, node types) and validates it against Ray's
schema before it touches a cloud; `prepare_config` + `validate_config` below are those two steps
of the installed Ray. The other checks pin what the README promises: the same setup everywhere,
versions matching the driver, the dashboard on localhost, token authentication, the elastic range.
"""
from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

import raytrainer

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {name: REPO / "cluster" / f"{name}.yaml" for name in ("aws", "gcp", "local")}
ELASTIC_RANGE = (2, 4)  # the README's `--num-nodes 2:4`


def load(name: str) -> dict:
    return yaml.safe_load(CONFIGS[name].read_text())


def start_commands(config: dict) -> list[str]:
    return [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_passes_rays_validation(name: str) -> None:
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_catches_a_broken_config() -> None:
    """The check above can fail: a misspelt key is refused by the same functions."""
    import jsonschema

    broken = load("aws")
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dashboard_on_localhost_and_token_auth_on(name: str) -> None:
    config = load(name)
    head = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0]
    for command in start_commands(config):
        assert "0.0.0.0" not in command
        # exported in the same shell, before `ray start`: every Ray process on the node inherits it
        assert re.search(r"export RAY_AUTH_MODE=token;.*ray start", command), command
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_setup_installs_the_drivers_raytrainer_and_ray(name: str) -> None:
    config = load(name)
    project_version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert raytrainer.__version__ == project_version
    setup = "\n".join(config["setup_commands"])
    assert f"'{raytrainer.__version__}'" in setup  # the version check every node runs
    assert f"ray[default,train]=={ray.__version__}" in setup
    assert "pip install --quiet --no-build-isolation -e ~/raytrainer" in setup
    # Every shipped local path exists in the checkout, and together they make an installable project.
    for remote, local in config["file_mounts"].items():
        if remote.startswith("~/raytrainer/"):
            assert (REPO / local).exists(), local
            assert remote == "~/raytrainer/" + local.removeprefix("./")
    shipped = {local.removeprefix("./") for remote, local in config["file_mounts"].items()
               if remote.startswith("~/raytrainer/")}
    assert {"raytrainer", "pyproject.toml", "README.md", "examples"} <= shipped
    for image in [config.get("docker", {}).get("image")] + [
            t.get("docker", {}).get("worker_image") for t in config.get("available_node_types", {}).values()]:
        if image:
            assert image.startswith(f"rayproject/ray:{ray.__version__}-py311-"), image


def test_every_config_runs_the_same_setup() -> None:
    """The ray up test runs local.yaml's commands; the cloud configs must run the same ones."""
    local = load("local")
    for name in ("aws", "gcp"):
        config = load(name)
        for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
            assert config[key] == local[key], f"{name}.yaml {key} differs from local.yaml"


@pytest.mark.parametrize("name", ["aws", "gcp"])
def test_cloud_configs_have_a_cpu_head_and_elastic_gpu_and_cpu_workers(name: str) -> None:
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no ranks on the head
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert set(workers) == {"gpu_worker", "cpu_worker"}
    for worker in workers.values():
        assert (worker["min_workers"], worker["max_workers"]) == ELASTIC_RANGE
    assert config["max_workers"] >= sum(w["max_workers"] for w in workers.values())
    gpu, cpu = workers["gpu_worker"]["node_config"], workers["cpu_worker"]["node_config"]
    if name == "aws":
        assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
        assert gpu["InstanceType"].startswith(("g", "p")) and cpu["InstanceType"].startswith(("c", "m"))
        assert gpu["InstanceMarketOptions"] == cpu["InstanceMarketOptions"] == {"MarketType": "spot"}
        assert gpu["IamInstanceProfile"] and cpu["IamInstanceProfile"]  # S3 checkpoints from workers
    else:
        assert "guestAccelerators" not in head["node_config"] and "guestAccelerators" not in cpu
        assert gpu["guestAccelerators"][0]["acceleratorCount"] >= 1
        assert gpu["scheduling"]["provisioningModel"] == cpu["scheduling"]["provisioningModel"] == "SPOT"
        assert gpu["scheduling"]["onHostMaintenance"] == "TERMINATE"  # required for GPUs
        project = config["provider"]["project_id"]
        for worker in (gpu, cpu):  # gs:// checkpoints from workers, in the cluster's own project
            assert worker["serviceAccounts"][0]["email"].endswith(f"@{project}.iam.gserviceaccount.com")
    assert workers["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert config["docker"]["image"].endswith("-cpu")


def test_local_config_names_head_and_workers() -> None:
    config = load("local")
    provider = config["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert provider["head_ip"] not in provider["worker_ips"]
    assert config["min_workers"] <= config["max_workers"] == len(provider["worker_ips"])
    prepared = prepare_config(copy.deepcopy(config))
    node_type = prepared["available_node_types"]["local.cluster.node"]
    assert (node_type["min_workers"], node_type["max_workers"]) == (config["min_workers"], config["max_workers"])
