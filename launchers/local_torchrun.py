"""``python -m launchers.local_torchrun ARGS``: torchrun for a job on one machine, its stores on 127.0.0.1 only.

torchrun's rendezvous store and the store it hands to the workers (a ``torch.distributed.TCPStore`` server in the
torchrun agent) listen on every interface (``::``), whatever ``--master-addr`` / ``--rdzv-endpoint`` say: the
address only tells clients where to connect (measured with torch 2.13: ``--master-addr=127.0.0.1`` still listens on
``[::]:PORT``). On a shared machine that is an open, unauthenticated key-value store anyone on the network can write.
TCPStore accepts an already-listening socket (``master_listen_fd``), so here the server side of every TCPStore the
agent creates gets a socket bound to 127.0.0.1 on the port it asked for; then torchrun runs unchanged. Use it only
for single-node jobs (``--standalone``, or ``--nnodes=1`` with a 127.0.0.1 endpoint): ranks on other machines could
not reach a loopback store.
"""

from __future__ import annotations

import datetime
import socket
import sys
from typing import Any

__all__ = ["install", "main"]


def _make_store_class() -> Any:
    import torch.distributed as dist

    class LoopbackTCPStore(dist.TCPStore):  # type: ignore[misc]
        """A TCPStore whose server (``is_master``) listens on 127.0.0.1 only; clients are unchanged."""

        def __init__(
            self,
            host_name: str,
            port: int = 0,
            world_size: int | None = None,
            is_master: bool = False,
            timeout: datetime.timedelta = datetime.timedelta(seconds=300),
            wait_for_workers: bool = True,
            multi_tenant: bool = False,
            master_listen_fd: int | None = None,
            use_libuv: bool | None = None,
        ):
            if is_master and master_listen_fd is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", max(int(port), 0)))
                sock.listen(512)
                port = int(sock.getsockname()[1])
                master_listen_fd = sock.detach()
            kwargs: dict[str, Any] = {
                "world_size": world_size,
                "is_master": is_master,
                "timeout": timeout,
                "wait_for_workers": wait_for_workers,
                "multi_tenant": multi_tenant,
                "master_listen_fd": master_listen_fd,
            }
            if use_libuv is not None:
                kwargs["use_libuv"] = use_libuv
            super().__init__(host_name, port, **kwargs)

    return LoopbackTCPStore


def install() -> Any:
    """Make every TCPStore torchrun's agent creates a loopback one (the modules that hold the class by name)."""
    import torch.distributed as dist
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d_backend
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous as static_tcp
    import torch.distributed.rendezvous as rendezvous

    cls = _make_store_class()
    for module in (dist, c10d_backend, static_tcp, rendezvous):
        if hasattr(module, "TCPStore"):
            setattr(module, "TCPStore", cls)  # noqa: B010 - the modules hold the class by name
    return cls


def main(argv: list[str] | None = None) -> int:
    install()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
