"""Pick the launcher for a Plan: in-process, torch_xla's, or a Ray actor group."""
from __future__ import annotations

from typing import Any

from raytrainer.trainer.plan import Plan


def make_launcher(plan: Plan) -> Any:
    """Return the launcher object whose ``launch(trainer, fn, model, kwargs)`` runs the plan."""
    if plan.launcher == "in_process":
        from raytrainer.launchers.in_process import InProcessLauncher

        return InProcessLauncher(plan)
    if plan.launcher == "xla":
        from raytrainer.launchers.xla import XLALauncher

        return XLALauncher(plan)
    from raytrainer.launchers.ray.launcher import RayLauncher

    return RayLauncher(plan)
