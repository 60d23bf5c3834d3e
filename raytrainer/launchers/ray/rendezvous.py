"""How the ranks of a Ray worker group find each other and form a torch process group.

Rank 0 opens the TCP key-value store on its own node, binding port 0 so the operating system
hands out a free port (no pick-then-bind race), and reports (address, port) to the driver. Every
rank then sets the torchrun environment variables and joins the process group through that store.
"""
from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from raytrainer.strategies.base import RankContext

# The variables torchrun sets; user code and libraries read these to find their place.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0's store listens: every rank connects here to form the process group."""

    master_addr: str
    master_port: int


def default_backend(use_gpu: bool) -> str:
    """NCCL between GPUs, gloo on CPU: the backends torch supports for each."""
    return "nccl" if use_gpu else "gloo"


def open_master_store(host: str, timeout_s: float) -> dist.TCPStore:
    """Start the store server on this node on a free port; its ``.port`` says which one."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


def torchrun_env(ctx: RankContext, rdzv: Rendezvous) -> dict[str, str]:
    """The environment torchrun would give this rank."""
    return {
        "RANK": str(ctx.global_rank),
        "LOCAL_RANK": str(ctx.local_rank),
        "WORLD_SIZE": str(ctx.world_size),
        "LOCAL_WORLD_SIZE": str(ctx.local_world_size),
        "GROUP_RANK": str(ctx.node_rank),
        "NODE_RANK": str(ctx.node_rank),
        "MASTER_ADDR": rdzv.master_addr,
        "MASTER_PORT": str(rdzv.master_port),
    }


def interface_for_ip(ip: str) -> str | None:
    """The network interface that carries ``ip`` on this machine, if one does."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address == ip for a in addrs):
            return name
    return None


def init_process_group(ctx: RankContext, rdzv: Rendezvous, backend: str, timeout_s: float,
                       master_store: dist.TCPStore | None = None,
                       device_id: int | None = None, node_ip: str | None = None) -> None:
    """Join the default process group; rank 0 passes the store it opened, others connect to it.

    ``timeout_s`` bounds both the connection to the store and every later collective.
    ``node_ip`` (the address Ray reaches this node at) pins gloo to that interface: gloo otherwise
    follows the hostname, which many Linux images map to 127.0.1.1, and peers cannot reach that.
    """
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this "
                           "process; call destroy_process_group() before joining a new one")
    os.environ.update(torchrun_env(ctx, rdzv))
    if backend == "gloo" and node_ip and "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = interface_for_ip(node_ip)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    timeout = timedelta(seconds=timeout_s)
    if master_store is not None:
        store = master_store
    else:
        store = dist.TCPStore(rdzv.master_addr, rdzv.master_port, None, False, timeout)
    # init_process_group prefixes the stores it creates itself; do the same so keys never collide
    # with anything else a user puts into this store.
    store = dist.PrefixStore("default_pg", store)
    kwargs = {}
    if backend == "nccl" and device_id is not None:
        import torch

        kwargs["device_id"] = torch.device("cuda", device_id)
    before = _open_sockets()
    dist.init_process_group(backend=backend, store=store, rank=ctx.global_rank,
                            world_size=ctx.world_size, timeout=timeout, **kwargs)
    _GROUP_SOCKETS.clear()  # gloo connects to every peer while the group is made (TORCH_GLOO_LAZY_INIT unset)
    _GROUP_SOCKETS.update((fd, link) for fd, link in _open_sockets().items() if before.get(fd) != link)


# The sockets this process opened while joining its process group: gloo's connections to its peers, by file
# descriptor, with the socket each descriptor named then (a descriptor closed and reused names another one).
_GROUP_SOCKETS: dict[int, str] = {}


def _open_sockets() -> dict[int, str]:
    """This process's socket descriptors -> "socket:[inode]" (Linux /proc; empty elsewhere)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    found = {}
    for name in names:
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:"):
            found[int(name)] = link
    return found


def cut_group_connections() -> int:
    """Shut down (not close) the connections this process's process group opened to its peers; how many.

    After a failure the group is abandoned, but destroying it waits for its queued collectives, which wait for peers
    that wait for this rank in turn: in an 8-rank ring that held ranks in their all-reduce until the collective
    timeout. Shut down, the sockets fail every pending read and write here and on the peers at once; the
    descriptors stay gloo's to close."""
    import socket

    cut = 0
    for fd, link in list(_GROUP_SOCKETS.items()):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != link:
                continue  # closed since, and the number reused for something else
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue  # gloo's connections are TCP
                sock.getpeername()  # a connection, not gloo's listener (shut down, its accept() aborts the process)
                sock.shutdown(socket.SHUT_RDWR)
            cut += 1
        except OSError:
            continue  # already closed or not connected
    _GROUP_SOCKETS.clear()
    return cut


def destroy_process_group() -> bool:
    """Leave the default process group if this process is in one; True if it was."""
    return release_process_group() is not None


# Set by a rank whose run shards its module (FSDP): its DTensors' device mesh keeps the process group, and so its
# connections, alive after destroy_process_group, so a rank that raised must exit for its peers to be released.
SHARDED_MODULE_HOLDS_GROUP = False


def release_process_group() -> bool | None:
    """Leave the default process group; None if not in one. True when its connections closed (peers blocked on this
    rank get an error), False when something still holds the group (a sharded module's device mesh does), which
    keeps the connections open."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    import gc
    import weakref

    group = dist.distributed_c10d._get_default_group()
    held = weakref.ref(group)
    dist.destroy_process_group()
    _forget_default_arguments(group)
    del group
    gc.collect()
    return held() is None


def _forget_default_arguments(group: Any) -> None:
    """Replace ``group`` by None (the default group) in the default arguments of torch.distributed's functions.

    ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` when it is imported (DDP imports it), so its
    functions keep the first process group alive, and with it the group's open connections, after it is destroyed:
    a rank that raised then left its peers blocked in their collective until the timeout. A warm rank reused by the
    next run kept the old group's connections too."""
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("torch.distributed"):
            continue
        for value in list(vars(module).values()):
            defaults = value.__defaults__ if type(value) is types.FunctionType else None
            if defaults and any(d is group for d in defaults):
                value.__defaults__ = tuple(None if d is group else d for d in defaults)
