"""Launchers run one call of a plan: in this process, through torch_xla, or on a group of Ray actors."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raytrainer.launchers.base import Launcher
    from raytrainer.plan import Plan


def make_launcher(plan: Plan) -> Launcher:
    """The launcher that runs ``plan``: in this process, through torch_xla, or on a group of Ray actors."""
    if plan.launcher == "in_process":
        from raytrainer.launchers.in_process import InProcessLauncher

        return InProcessLauncher(plan)
    if plan.launcher == "xla":
        from raytrainer.launchers.xla import XLALauncher

        return XLALauncher(plan)
    from raytrainer.launchers.ray.launcher import RayLauncher

    return RayLauncher(plan)
