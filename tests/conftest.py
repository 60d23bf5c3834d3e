"""Shared fixtures: a real S3-compatible server (moto) on a free local port; pytorch_lightning as the oracle."""
from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    """Start one moto S3 server on 127.0.0.1 for the whole session and return its http endpoint."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_server(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """A fresh bucket on the local moto server, with the environment set so s3:// URIs resolve to it.

    Yields ``endpoint`` (http://127.0.0.1:PORT), ``bucket``, ``uri`` (s3://bucket), ``env`` (the
    variables set here; pass them to Ray workers via ``runtime_env={"env_vars": env}``) and
    ``filesystem`` (a pyarrow S3FileSystem pointed at the server).
    """
    import boto3
    import pyarrow.fs as pafs

    env = {
        "RAYTRAINER_S3_ENDPOINT": _moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=_moto_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    filesystem = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                   scheme="http", endpoint_override=_moto_endpoint.split("://", 1)[1],
                                   connect_timeout=10)
    yield {"endpoint": _moto_endpoint, "bucket": bucket, "uri": f"s3://{bucket}", "env": env,
           "filesystem": filesystem, "client": client}


LOCAL_CPUS = 10  # logical CPUs: the 8-rank test plus the shared 2-rank group, on any machine


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray instance started by ensure_ray for the module, shut down after it (a process holds one Ray
    session at a time, so whatever session was left is shut down first)."""
    import ray

    from raytrainer.launchers.ray.group import ensure_ray

    if ray.is_initialized():
        ray.shutdown()
    # "local": never join another program's cluster that happens to run on this machine.
    started = ensure_ray(LOCAL_CPUS, address="local")
    assert ray.cluster_resources().get("CPU", 0) >= LOCAL_CPUS, \
        "connected to a Ray cluster with too few CPUs for these tests"
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def L():
    """pytorch_lightning, the oracle that interop tests compare against, with its console chatter off."""
    lightning = pytest.importorskip("pytorch_lightning")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return lightning


def _write_parquet(where, n: int = 3000, files: int = 3, row_group: int = 250, filesystem=None) -> int:
    """``files`` files of ``n // files`` rows: a row id, an 8-float feature vector, a target and a name."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if filesystem is None:
        os.makedirs(where, exist_ok=True)
    per = n // files
    g = np.random.default_rng(0)
    for f in range(files):
        ids = np.arange(f * per, (f + 1) * per)
        x = g.standard_normal((per, 8)).astype(np.float32)
        table = pa.table({"id": ids, "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8),
                          "y": x.sum(1, keepdims=False).astype(np.float32), "name": [f"r{i}" for i in ids]})
        path = f"{where}/part-{f}.parquet"
        pq.write_table(table, path if filesystem is None else path.split("://", 1)[1], row_group_size=row_group,
                       filesystem=filesystem)
    return per * files


@pytest.fixture(scope="session")
def parquet_writer():
    """Writes a small Parquet table (see _write_parquet) for the data tests; returns its row count."""
    return _write_parquet
