"""A cluster job's default root inside Ray's per-job working directory (deleted with the Ray session) gets one
clear warning that says what to pass instead."""
from __future__ import annotations

import logging

import raytrainer as pl


def capture(caplog, fn):
    logger = logging.getLogger("raytrainer")
    logger.addHandler(caplog.handler)
    try:
        fn()
    finally:
        logger.removeHandler(caplog.handler)


def test_a_root_inside_rays_job_directory_warns_once(tmp_path, monkeypatch, caplog):
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    capture(caplog, lambda: [pl.Trainer(logger=False) for _ in range(2)])
    assert caplog.text.count("Ray deletes with its session") == 1
    assert "without default_root_dir" in caplog.text and "--default_root_dir s3://" in caplog.text


def test_a_lasting_root_does_not_warn(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    capture(caplog, lambda: pl.Trainer(logger=False, default_root_dir=str(tmp_path / "runs")))
    assert "Ray deletes" not in caplog.text
