"""``raytrainer consolidate``: turn a sharded checkpoint directory into one Lightning-format ``.ckpt`` file."""
from __future__ import annotations

import argparse

from raytrainer.cli.common import CLIError

__all__ = ["cmd_consolidate"]


def cmd_consolidate(args: argparse.Namespace) -> int:
    """Verify CKPT_DIR against its manifest, gather every shard into plain tensors and write OUT atomically."""
    from raytrainer.checkpoint import sharded
    from raytrainer.io import storage

    if not sharded.is_directory(args.checkpoint_dir):
        raise CLIError(f"{args.checkpoint_dir} is not a directory; consolidate takes a sharded checkpoint directory "
                       "(a single-file checkpoint is already consolidated)")
    if storage.exists(args.output) and not args.force:
        raise CLIError(f"{args.output} exists; pass --force to replace it, or choose another output file")
    try:
        ckpt = sharded.consolidate(args.checkpoint_dir, weights_only=not args.trust)
    except (FileNotFoundError, sharded.ShardedCheckpointError) as exc:
        raise CLIError(str(exc)) from exc
    except Exception as exc:
        if "weights only load failed" in str(exc).lower():
            raise CLIError(f"{args.checkpoint_dir}/meta.pt holds Python objects that are refused by default; pass "
                           "--trust if you trust this checkpoint") from exc
        raise
    storage.save(ckpt, args.output)
    n = sum(v.numel() for v in ckpt["state_dict"].values() if hasattr(v, "numel"))
    print(f"wrote {args.output}: {len(ckpt['state_dict'])} tensors ({n} values), "
          f"{len(ckpt.get('optimizer_states', []))} optimizer state(s), epoch {ckpt.get('epoch')}, "
          f"global_step {ckpt.get('global_step')}")
    return 0
