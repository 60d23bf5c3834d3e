"""How much of pytorch_lightning's public API raytrainer has, counted with ``inspect``/``dir`` on both.

Counts, each against the installed pytorch_lightning (2.6 in the dev extra):
- Trainer arguments: parameters of ``Trainer.__init__`` that ours accepts by name;
- Trainer attributes: public names on the class (properties, methods), and on a built Trainer (with the
  attributes set in ``__init__``);
- LightningModule names: public names of Lightning's LightningModule that torch.nn.Module does not have;
- LightningDataModule names: its public names;
- callbacks, loggers, profilers: the names in each Lightning package's ``__all__`` that ours exports.
Module and datamodule names are compared on instances, so attributes set in ``__init__`` count.

    python benchmarks/api_counts.py [--missing]
"""
from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def public(obj: object) -> set[str]:
    """Public names of an object (what ``dir`` lists without a leading underscore)."""
    return {n for n in dir(obj) if not n.startswith("_")}


def counts(L: object, R: object, workdir: str) -> list[tuple[str, set[str], set[str]]]:
    """(what, Lightning's names, the names raytrainer lacks) for each API surface."""
    def args(trainer_cls: type) -> set[str]:
        return {p for p in inspect.signature(trainer_cls.__init__).parameters if p not in ("self", "unknown")}

    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir)
    lt, rt = public(L.Trainer(**kw)), public(R.Trainer(**kw))
    nn_names = public(torch.nn.Module())
    lm = public(type("M", (L.LightningModule,), {})()) - nn_names
    rm = public(type("M", (R.LightningModule,), {})()) - nn_names
    ld, rd = public(L.LightningDataModule()), public(R.LightningDataModule())
    lc, rc = public(L.Trainer), public(R.Trainer)
    return [("Trainer arguments", args(L.Trainer), args(L.Trainer) - args(R.Trainer)),
            ("Trainer attributes (class)", lc, lc - rc),
            ("Trainer attributes (built)", lt, lt - rt),
            ("LightningModule names", lm, lm - rm),
            ("LightningDataModule names", ld, ld - rd)] + [
        (f"{pkg}.__all__", set(getattr(L, pkg).__all__),
         set(getattr(L, pkg).__all__) - public(getattr(R, pkg)))
        for pkg in ("callbacks", "loggers", "profilers")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--missing", action="store_true", help="list the names raytrainer lacks")
    opts = parser.parse_args()
    warnings.filterwarnings("ignore")
    import pytorch_lightning as L

    import raytrainer as R

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as workdir:
        rows = counts(L, R, workdir)
    print(f"pytorch_lightning {L.__version__} vs raytrainer {R.__version__}")
    for what, theirs, missing in rows:
        print(f"{what:<30} {len(theirs) - len(missing):>3} of {len(theirs)}")
        if opts.missing and missing:
            print(f"    missing: {', '.join(sorted(missing))}")


if __name__ == "__main__":
    main()
