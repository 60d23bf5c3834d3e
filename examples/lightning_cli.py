"""The digits autoencoder under LightningCLI: model, data and Trainer arguments from YAML files and flags.

    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml                  # in-process
    python examples/lightning_cli.py fit --config examples/lightning_cli.yaml --trainer.num_processes 2  # 2 Ray ranks
    python examples/lightning_cli.py fit -c examples/lightning_cli.yaml --model.lr 0.01 --data.batch_size 32
    python examples/lightning_cli.py fit -c examples/lightning_cli.yaml --optimizer SGD --optimizer.lr 0.1
    python examples/lightning_cli.py test -c examples/lightning_cli.yaml --ckpt_path last
    python examples/lightning_cli.py fit -c examples/lightning_cli.yaml --print_config   # the resolved config
    raytrainer fit examples/lightning_cli.py --address http://127.0.0.1:8265 --num-nodes 2:4 \\
        -- fit -c examples/lightning_cli.yaml --trainer.default_root_dir s3://my-bucket/runs/cli

Each run writes the resolved config as config.yaml next to the logger's files in lightning_logs/version_N/.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from examples.autoencoder import DigitsDataModule, LitAutoEncoder  # noqa: E402
from raytrainer.cli import LightningCLI  # noqa: E402


def main(args: list[str] | None = None) -> LightningCLI:
    """Parse the command line (or ``args``), build the classes and run the subcommand."""
    cli = LightningCLI(LitAutoEncoder, DigitsDataModule, args=args)
    trainer = cli.trainer
    if cli.subcommand == "fit":
        loss = trainer.callback_metrics.get("val_loss")
        print(f"world size: {trainer.world_size}, epochs: {trainer.current_epoch}, steps: {trainer.global_step}, "
              f"val_loss: {float(loss) if loss is not None else float('nan'):.4f}")
        print(f"logs: {trainer.log_dir}")
    return cli


if __name__ == "__main__":
    main()
