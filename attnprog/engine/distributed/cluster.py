"""Connecting to a Ray cluster, and what it offers (CPUs, GPUs, nodes)."""

from __future__ import annotations

from attnprog.errors import ClusterError

INSTALL_HINT = "install Ray with `pip install 'attnprog[ray]'` (or `pip install ray`)"


def require_ray():
    """The ``ray`` module, or a ClusterError that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ClusterError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from err
    return ray


def connect(address: str = "auto"):
    """Connect this process to the Ray cluster at ``address`` once; later calls reuse it.

    ``"auto"`` joins the cluster running on this machine (``ray start --head``, or
    ``RAY_ADDRESS``) and starts a local one with this machine's CPUs and GPUs when there is
    none; anything else (``HOST:PORT``, ``ray://HOST:10001``) must be reachable.
    Returns the ``ray`` module.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    options = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
    if address.startswith("ray://"):
        _require_client(address)
    if address not in ("", "auto", "local"):
        _check_reachable(address)  # Ray itself retries an unreachable address for minutes
    try:
        if address in ("", "auto", "local"):
            ray.init(**options)  # joins a running cluster, else starts one here
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterError(
            f"could not reach a Ray cluster at {address!r} ({err}); start one with "
            "`ray start --head` on the head node and `ray start --address HEAD:6379` on the "
            "others, then pass --ray HEAD:6379 (or --ray auto on the head node)"
        ) from err
    return ray


def _require_client(address: str) -> None:
    """Raise ClusterError when a ``ray://`` address cannot be used: Ray Client needs grpcio,
    which ``pip install ray`` leaves out."""
    try:
        import grpc  # noqa: F401
    except ImportError as err:
        raise ClusterError(
            f"--ray {address} goes through Ray Client, which is not installed: "
            "`pip install 'ray[client]'`, or on a node of the cluster pass --ray HEAD:6379"
        ) from err


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ClusterError at once when nothing listens at ``address`` (HOST:PORT)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--ray {address!r} is not HOST:PORT, ray://HOST:PORT or 'auto'")
    try:  # an IPv6 host is written in brackets, [::1]:6379, which socket does not take
        socket.create_connection((host.removeprefix("[").removesuffix("]"), int(port)),
                                 timeout=timeout).close()
    except OSError as err:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one with "
            "`ray start --head` and pass the address it prints, or --ray auto on its head node"
        ) from err


def resources() -> dict[str, float]:
    """The cluster's total resources: {"CPU": ..., "GPU": ..., "nodes": ...}."""
    import ray

    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"CPU": float(total.get("CPU", 0)), "GPU": float(total.get("GPU", 0)),
            "nodes": float(len(nodes))}


def describe() -> str:
    """One line on the cluster, for the CLI: nodes, CPUs and GPUs."""
    found = resources()
    return (f"Ray cluster: {int(found['nodes'])} node(s), {found['CPU']:g} CPUs, "
            f"{found['GPU']:g} GPUs")
