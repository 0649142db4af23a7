"""Benchmark splits: deterministic scenario routes on disjoint ranges of town seeds.

| split | routes per type | town seeds |
|---|---|---|
| ``test``  | 5  (44 x 5 = 220, like Bench2Drive) | 10000 .. 10019 |
| ``val``   | 2  | 20000 .. 20009 |
| ``train`` | 20 | 30000 .. 30199 |
| ``long``  | 36 routes in all (like Longest6), 500-1500 m each, chaining 3-6 scenarios | 40000 .. 40019 |

``split_specs(split)`` returns ``ScenarioInstance`` s sorted by type, then route number. Each instance's
``spec.map_index`` indexes :func:`split_town_seeds` (``split`` or the ``town_seeds`` passed), so::

    seeds = split_town_seeds("test")
    world = World([generate_town(s) for s in seeds])
    insts = split_specs("test")

Route ``k`` of a type goes to town ``pool[(h(type) + k * step) % len(pool)]``; when that town cannot host
the type the next towns of the pool are tried (deterministically). The route's random draws come from
``numpy.random.default_rng([split id, type index in B2D order, k])``, so the same arguments give the same
scenarios.

``long`` (a Longest6-like transfer split): ``routes`` counts long routes in all (default 36). Long route ``k``
goes to town ``pool[(h("Long") + k * step) % len(pool)]`` (next towns of the pool when it cannot host one)
and draws from ``numpy.random.default_rng([4, k, tries])``; it chains 3-6 scenarios of different types
(``types`` restricts the candidates) with background traffic along a 500-1500 m route, see
:mod:`craft.scenarios.long`. Its instances have ``type == "Long"`` and ``meta["types"]``, the chained types in
route order; a long route's tick cap grows with its length (``ScenarioInstance.time_limit_s``).

Per-route seeding: an evaluation seeds each route's world with :func:`route_seed` of the route's
:func:`route_identity` (split, type, k, town seed) and the evaluation seed, so a route's result does not
depend on the other routes evaluated with it (``--routes``, ``--types``, ``--batch-size``, sharding).

Scenario types of Bench2Drive that are not implemented yet are **skipped with a warning**
(``UserWarning`` naming them); ``strict=True`` raises :class:`CraftError` instead.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np

from craft.errors import CraftError
from craft.scenarios.base import ScenarioInstance, build_scenario, implemented_types
from craft.scenarios.seeding import instance_seed, route_identity, route_seed  # noqa: F401  (re-exported)

B2D_TYPES = (
    "Accident", "AccidentTwoWays", "BlockedIntersection", "ConstructionObstacle", "ConstructionObstacleTwoWays",
    "ControlLoss", "CrossingBicycleFlow", "DynamicObjectCrossing", "EnterActorFlow", "HardBreakRoute",
    "HazardAtSideLane", "HazardAtSideLaneTwoWays", "HighwayCutIn", "HighwayExit", "InterurbanActorFlow",
    "InterurbanAdvancedActorFlow", "InvadingTurn", "MergerIntoSlowTraffic", "MergerIntoSlowTrafficV2",
    "NonSignalizedJunctionLeftTurn", "NonSignalizedJunctionLeftTurnEnterFlow", "NonSignalizedJunctionRightTurn",
    "OppositeVehicleRunningRedLight", "OppositeVehicleTakingPriority", "ParkedObstacle", "ParkedObstacleTwoWays",
    "ParkingCrossingPedestrian", "ParkingCutIn", "ParkingExit", "PedestrianCrossing", "SequentialLaneChange",
    "SignalizedJunctionLeftTurn", "SignalizedJunctionLeftTurnEnterFlow", "SignalizedJunctionRightTurn",
    "StaticCutIn", "T_Junction", "VanillaNonSignalizedTurn", "VanillaNonSignalizedTurnEncounterStopsign",
    "VanillaSignalizedTurnEncounterGreenLight", "VanillaSignalizedTurnEncounterRedLight", "VehicleOpensDoorTwoWays",
    "VehicleTurningRoute", "VehicleTurningRoutePedestrian", "YieldToEmergencyVehicle",
)
assert len(B2D_TYPES) == 44

SPLITS = {
    # name: (split id, first town seed, number of town seeds, routes per type)
    "test": (1, 10000, 20, 5),
    "val": (2, 20000, 10, 2),
    "train": (3, 30000, 200, 20),
    "long": (4, 40000, 20, 36),  # routes in all, not per type
}


ROUTES_PER_TYPE_MAX = 1000
"""Routes per type a split may ask for (route numbers are ``type index x 1000 + k``)."""


def route_number(scenario_type: str, k: int) -> int:
    """A route's number within its split: ``1000 x (index of its type in B2D_TYPES) + k`` (the long split's
    type ``Long`` comes after the 44: ``44000 + k``). It names the route in results
    (``RouteScenario_<number>_rep0``) whatever other routes are evaluated with it."""
    ti = B2D_TYPES.index(scenario_type) if scenario_type in B2D_TYPES else len(B2D_TYPES)
    if not 0 <= int(k) < ROUTES_PER_TYPE_MAX:
        raise CraftError(f"route number k must be in [0, {ROUTES_PER_TYPE_MAX}), got {k}")
    return ti * ROUTES_PER_TYPE_MAX + int(k)


def split_town_seeds(split: str) -> list[int]:
    """The town seeds of ``split`` (disjoint between splits); map_index i of its instances = seed i."""
    if split not in SPLITS:
        raise CraftError(f"unknown split '{split}' (one of {sorted(SPLITS)})")
    _, first, n, _ = SPLITS[split]
    return list(range(first, first + n))


def missing_types() -> list[str]:
    """Bench2Drive types without a builder yet."""
    have = set(implemented_types())
    return [t for t in B2D_TYPES if t not in have]


def split_specs(split: str, town_seeds: list[int] | None = None, routes: int | None = None,
                types: list[str] | None = None, strict: bool = False, towns: dict | None = None) -> list[ScenarioInstance]:
    """Deterministic scenario instances of ``split`` (see the module docstring).

    town_seeds: override the split's town pool (``spec.map_index`` then indexes this list).
    routes: routes per type (default 5 test / 2 val / 20 train); for ``long`` routes in all (default 36).
    types: restrict to these types (``long``: the types that may be chained).
    """
    from craft.world.towns import generate_town

    if split not in SPLITS:
        raise CraftError(f"unknown split '{split}' (one of {sorted(SPLITS)})")
    sid, _, _, default_routes = SPLITS[split]
    pool = list(town_seeds) if town_seeds is not None else split_town_seeds(split)
    if not pool:
        raise CraftError("split_specs needs at least one town seed")
    n_routes = default_routes if routes is None else int(routes)
    if not 1 <= n_routes <= ROUTES_PER_TYPE_MAX:
        raise CraftError(f"routes must be in 1..{ROUTES_PER_TYPE_MAX}, got {routes}")
    wanted = list(dict.fromkeys(types)) if types is not None else list(B2D_TYPES)  # a repeated type runs once
    unknown = [t for t in wanted if t not in B2D_TYPES]
    if unknown:
        raise CraftError(f"unknown scenario types {unknown}; Bench2Drive types are {list(B2D_TYPES)}")
    have = set(implemented_types())
    missing = [t for t in wanted if t not in have]
    if missing:
        msg = (f"scenario types not implemented yet, skipped: {missing}; implemented: {sorted(have)}")
        if strict:
            raise CraftError(msg)
        warnings.warn(msg, stacklevel=2)
    towns = {} if towns is None else towns  # seed -> RoadMap, filled as towns are generated

    def town(i):
        s = pool[i]
        if s not in towns:
            try:
                towns[s] = generate_town(s)
            except CraftError as e:
                raise CraftError(f"split '{split}': town seed {s}: {e}") from None
        return towns[s]

    step = 7 if len(pool) % 7 else 3
    if split == "long":
        return _long_specs(sid, pool, town, n_routes, [t for t in wanted if t in have], step)
    out = []
    for t in wanted:
        if t not in have:
            continue
        ti = B2D_TYPES.index(t)
        h = zlib.crc32(t.encode())
        for k in range(n_routes):
            base = (h + k * step) % len(pool)
            err = None
            for tries in range(min(len(pool), 8)):
                mi = (base + tries) % len(pool)
                rng = np.random.default_rng([sid, ti, k, tries])
                try:
                    inst = build_scenario(t, town(mi), rng, map_index=mi)
                    inst.meta["split"] = split
                    inst.meta["route_id"] = k
                    out.append(inst)
                    break
                except CraftError as e:
                    err = e
            else:
                raise CraftError(f"split '{split}': no town of the pool could host '{t}' route {k}: {err}")
    return out


def _long_specs(sid: int, pool: list[int], town, n_routes: int, types: list[str], step: int) -> list[ScenarioInstance]:
    """The ``long`` split's routes (see the module docstring)."""
    from craft.scenarios.long import LONG_TYPE, NOT_CHAINED, LongRouteConfig, build_long_route

    chainable = [t for t in types if t not in NOT_CHAINED]
    need = LongRouteConfig().min_scenarios
    if len(chainable) < need:
        raise CraftError(f"split 'long' chains at least {need} scenario types per route; the chainable types "
                         f"given are {chainable} (not chained: {list(NOT_CHAINED)})")
    h = zlib.crc32(LONG_TYPE.encode())
    out = []
    for k in range(n_routes):
        base = (h + k * step) % len(pool)
        errs = []
        for tries in range(min(len(pool), 8)):
            mi = (base + tries) % len(pool)
            rng = np.random.default_rng([sid, k, tries])
            try:
                inst = build_long_route(town(mi), rng, types, map_index=mi)
            except CraftError as e:
                errs.append(f"town seed {pool[mi]}: {e}")
                continue
            inst.meta["split"] = "long"
            inst.meta["route_id"] = k
            out.append(inst)
            break
        else:
            raise CraftError(f"split 'long': no town of the pool could host long route {k}: {errs[0]}")
    return out


def load_split(split: str, town_seeds: list[int] | None = None, routes: int | None = None,
               types: list[str] | None = None) -> tuple[list[ScenarioInstance], list]:
    """The instances of :func:`split_specs` and the towns they use, ready for ``World(towns)``.

    Each instance's ``spec.map_index`` is re-pointed into the returned town list (towns of the pool that no
    route uses are left out); the towns are the ones ``split_specs`` generated, not generated again.
    """
    pool = list(town_seeds) if town_seeds else split_town_seeds(split)
    cache: dict = {}
    instances = split_specs(split, town_seeds=pool, routes=routes, types=types, towns=cache)
    if not instances:
        raise CraftError(f"split '{split}' produced no routes")
    used = sorted({inst.spec.map_index for inst in instances})
    remap = {m: i for i, m in enumerate(used)}
    for inst in instances:
        inst.spec.map_index = remap[inst.spec.map_index]
    return instances, [cache[pool[m]] for m in used]


__all__ = ["B2D_TYPES", "SPLITS", "route_number", "route_identity", "route_seed", "instance_seed", "split_specs",
           "load_split", "split_town_seeds", "missing_types"]
