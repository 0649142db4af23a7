"""Ray plumbing shared by the sharded evaluation (:mod:`craft.bench.runner`) and the fine-tuning workers
(:mod:`craft.finetune.distributed`): start or join Ray, GPU options for tasks and actors, and ``ray.get`` with
one-line errors. Ray is imported inside the functions only, so ``import craft`` does not load it.
"""

from __future__ import annotations

import os
import socket

from craft.errors import CraftError


def init_ray(address: str | None, cpus: int) -> bool:
    """Start a local Ray instance (``address`` None, ``cpus`` logical CPUs, at least the machine's cores) or
    join the cluster at ``address`` (``auto``: the one ``ray start`` made on this machine; ``HOST:PORT``).
    Returns whether this call started it (the caller shuts it down). A running Ray is reused."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        raise CraftError("Ray is not installed: pip install ray (it comes with the project's install)") from None
    if ray.is_initialized():
        return False
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if address not in (None, "auto"):
        _check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=max(cpus, os.cpu_count() or 1), **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CraftError(f"could not {'start Ray' if address is None else f'join the Ray cluster at {address}'}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__} (start one with "
                         "`ray start --head`, or leave out --address for a local one)") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A one-line error, in seconds rather than Ray's minutes of retries, when nothing listens at HOST:PORT."""
    addr = address.split("://", 1)[-1]
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise CraftError(f"--address must be auto or HOST:PORT, got '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CraftError(f"no Ray cluster answers at {address} ({e.strerror or e}); start its head with "
                         "`ray start --head` and pass the address it prints") from None


def gpu_options(device: str, n: int) -> dict:
    """Ray resource options for ``n`` tasks / actors on ``device`` (a GPU share each on CUDA)."""
    import ray

    if not str(device).startswith("cuda"):
        return {}
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus <= 0:
        raise CraftError("--device cuda with Ray workers: the Ray cluster has no GPU")
    return {"num_gpus": min(1.0, gpus / n)}


def ray_get(refs, what: str):
    """``ray.get(refs)``; a worker's failure becomes one CraftError line (its own, if it raised one)."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:  # an exception inside a worker: its own one-line message
        cause = e.cause if getattr(e, "cause", None) is not None else e
        if isinstance(cause, CraftError):
            raise CraftError(str(cause)) from None
        raise CraftError(f"Ray worker failed during {what}: {type(cause).__name__}: "
                         f"{str(cause).splitlines()[0] if str(cause) else ''}") from None


__all__ = ["init_ray", "gpu_options", "ray_get"]
