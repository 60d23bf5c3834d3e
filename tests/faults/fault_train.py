"""One short real training run for the fault-injection suite: ``python fault_train.py CONFIG_JSON``.

CONFIG_JSON keys: root (default_root_dir: a path or s3:// URI), workdir (local folder for markers and the result),
tag, num_processes, max_epochs, every_n (ModelCheckpoint.every_n_train_steps), ckpt_path (None or "last"),
max_failures, sleep_s, start_at (unix time to wait for before fit: runs started together), inject (None or
{step, sig, target, rank}: see fault_models.Injector). On a clean end it writes workdir/result.pt (flat parameters,
global_step, the checkpoint fit resumed from)."""
from __future__ import annotations

import json
import os
import sys
import time

import torch
from fault_models import FaultModel, Injector, flat_params, loader

import raytrainer as pl


def main(cfg: dict) -> None:
    workdir = cfg["workdir"]
    with open(os.path.join(workdir, "started"), "w") as f:
        f.write(str(time.time()))
    inject = cfg.get("inject") or {}
    pl.seed_everything(0)
    model = FaultModel(tag=cfg["tag"], sleep_s=cfg.get("sleep_s", 0.0))
    checkpoint = pl.ModelCheckpoint(save_last=True, every_n_train_steps=cfg["every_n"], save_top_k=-1)
    trainer = pl.Trainer(
        num_processes=cfg.get("num_processes", 1), max_epochs=cfg.get("max_epochs", 2), deterministic=True,
        default_root_dir=cfg["root"], max_failures=cfg.get("max_failures", 0),
        callbacks=[checkpoint, Injector(workdir, **inject)], enable_progress_bar=False, enable_model_summary=False)
    if cfg.get("start_at"):
        time.sleep(max(0.0, cfg["start_at"] - time.time()))
    trainer.fit(model, loader(), ckpt_path=cfg.get("ckpt_path"))
    result = {"params": flat_params(model), "global_step": trainer.global_step, "ckpt_path": trainer.ckpt_path}
    torch.save(result, os.path.join(workdir, ".result.pt"))
    os.replace(os.path.join(workdir, ".result.pt"), os.path.join(workdir, "result.pt"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
