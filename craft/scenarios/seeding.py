"""Per-route seeding: a route's world is seeded from the route's own identity and the evaluation seed, so its
record does not depend on which routes share its batch, their order, the batch size or the process (shard)
that runs it. Re-exported by :mod:`craft.scenarios.splits`.
"""

from __future__ import annotations

import zlib

from craft.errors import CraftError


def route_identity(split: str, scenario_type: str, k: int, town_seed: int) -> str:
    """What makes a route the route it is: ``"<split>/<type>/<k>/<town seed>"`` (the town seed is part of it:
    ``--town-seeds`` moves route k of a type to another town)."""
    return f"{split}/{scenario_type}/{int(k)}/{int(town_seed)}"


def route_seed(identity: str, seed: int) -> int:
    """The seed of one route's world (background traffic placement and random stream): a pure function of
    the route's :func:`route_identity` and the evaluation seed, in ``[0, 2**31 - 1)``. It does not depend on
    which routes share the batch, their order, the batch size or the process that runs the route.

    >>> route_seed("test/Accident/0/10013", 0) == route_seed("test/Accident/0/10013", 0)
    True
    """
    return zlib.crc32(f"{identity}#{int(seed)}".encode()) % (2**31 - 1)


def instance_seed(inst, seed: int) -> int:
    """:func:`route_seed` of a split instance (``meta["split"]``, ``meta["route_id"]`` = k, ``town_seed``)."""
    m = inst.meta
    for key in ("split", "route_id"):
        if key not in m:
            raise CraftError(f"instance_seed: the {inst.type} instance has no meta[{key!r}] (not made by split_specs)")
    return route_seed(route_identity(m["split"], inst.type, m["route_id"], inst.town_seed), seed)


__all__ = ["route_identity", "route_seed", "instance_seed"]
