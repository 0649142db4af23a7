"""Bench2Drive's metrics, as pure functions on plain per-route logs.

Source of truth: ``shared/reference/bench2drive.md`` and Bench2Drive's own scripts (the leaderboard's
``statistics_manager.py``, ``tools/merge_route_json.py``, ``tools/ability_benchmark.py``,
``tools/efficiency_smoothness_benchmark.py``). Nothing here touches the world or torch: the runner turns
the world's per-step :class:`~craft.world.state.StepEvents` into one :class:`RouteLog` per route, and

- :func:`score_route` gives the route's Bench2Drive JSON record (RC, IS, DS, status, infraction strings,
  meta; CRAFT's extras such as success, efficiency and comfort live in ``meta``);
- :func:`aggregate` gives the benchmark ``summary`` (DS, SR, RC, IS, efficiency, comfort, abilities,
  infractions per km);
- :func:`results_json` / :func:`validate_results` give and check the results file.

Bench2Drive's rules are followed as its code applies them (see docs/benchmark.md, "Where a published number
depends on Bench2Drive's code"): the comfort figure ``comfort`` reproduces its unit handling (a deg/s yaw
rate against rad/s bounds, the smoothed yaw rate as "yaw acceleration") and CRAFT's consistent variant is
``comfort_si``; efficiency counts every background vehicle and only fully passed checkpoints (plus the
last when > 95 % is done); the outside-lanes percentage is over route distance; the 200 s cap is reported
as its "Failed - TickRuntime" status without an infraction entry. Remaining deliberate deviations (each
marked "Deviation" where it happens): an incomplete route's RC is capped at 99.99 so that "RC == 100"
always means completed; mean RC / IS are over the routes present (the leaderboard divides by the total
number of routes; its ``global_record`` in the results file does divide by the total).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from craft.errors import CraftError

__all__ = [
    "ABILITIES",
    "SCENARIO_TYPES",
    "PENALTY",
    "INFRACTION_KEYS",
    "SCORED_KEYS",
    "PROTOCOLS",
    "COMFORT_BOUNDS",
    "END_REASONS",
    "CRASHED_STATUS",
    "SUMMARY_KEYS",
    "ABILITY_KEYS",
    "RouteLog",
    "route_completion",
    "infraction_score",
    "score_route",
    "crashed_record",
    "is_success",
    "efficiency",
    "comfort",
    "comfort_si",
    "savgol",
    "aggregate",
    "results_json",
    "validate_results",
    "load_results",
    "global_record",
]

# ---------------------------------------------------------------------- tables
_STARRED = (
    # Traffic_Signs' starred types, in the reference table's order (Merging first, then Emergency_Brake).
    "CrossingBicycleFlow", "EnterActorFlow", "NonSignalizedJunctionLeftTurn", "NonSignalizedJunctionRightTurn",
    "NonSignalizedJunctionLeftTurnEnterFlow", "SignalizedJunctionLeftTurn", "SignalizedJunctionRightTurn",
    "SignalizedJunctionLeftTurnEnterFlow",
    "BlockedIntersection", "OppositeVehicleTakingPriority", "OppositeVehicleRunningRedLight", "PedestrianCrossing",
    "VehicleTurningRoute", "VehicleTurningRoutePedestrian",
)
_SIGNS_ONLY = (
    "T_Junction", "VanillaNonSignalizedTurn", "VanillaSignalizedTurnEncounterGreenLight",
    "VanillaSignalizedTurnEncounterRedLight", "VanillaNonSignalizedTurnEncounterStopsign",
)

ABILITIES: dict[str, tuple[str, ...]] = {
    "Merging": (
        "CrossingBicycleFlow", "EnterActorFlow", "HighwayExit", "HighwayCutIn", "InterurbanActorFlow",
        "InterurbanAdvancedActorFlow", "MergerIntoSlowTraffic", "MergerIntoSlowTrafficV2",
        "NonSignalizedJunctionLeftTurn", "NonSignalizedJunctionRightTurn", "NonSignalizedJunctionLeftTurnEnterFlow",
        "ParkingExit", "SequentialLaneChange", "SignalizedJunctionLeftTurn", "SignalizedJunctionRightTurn",
        "SignalizedJunctionLeftTurnEnterFlow",
    ),
    "Overtaking": (
        "Accident", "AccidentTwoWays", "ConstructionObstacle", "ConstructionObstacleTwoWays", "HazardAtSideLane",
        "HazardAtSideLaneTwoWays", "ParkedObstacle", "ParkedObstacleTwoWays", "VehicleOpensDoorTwoWays",
    ),
    "Emergency_Brake": (
        "BlockedIntersection", "DynamicObjectCrossing", "HardBreakRoute", "OppositeVehicleTakingPriority",
        "OppositeVehicleRunningRedLight", "ParkingCutIn", "PedestrianCrossing", "ParkingCrossingPedestrian",
        "StaticCutIn", "VehicleTurningRoute", "VehicleTurningRoutePedestrian", "ControlLoss",
    ),
    "Give_Way": ("InvadingTurn", "YieldToEmergencyVehicle"),
    "Traffic_Signs": _STARRED + _SIGNS_ONLY,
}
"""The five abilities and their scenario types (reference table; Traffic_Signs overlaps Merging and
Emergency_Brake on the starred types)."""

SCENARIO_TYPES: tuple[str, ...] = (
    ABILITIES["Overtaking"] + ABILITIES["Merging"] + ABILITIES["Emergency_Brake"] + ABILITIES["Give_Way"] + _SIGNS_ONLY
)
"""All 44 scenario types, ordered by ability (Overtaking, Merging, Emergency_Brake, Give_Way, then the
Traffic_Signs-only types)."""

PENALTY: dict[str, float] = {
    "collisions_pedestrian": 0.5,
    "collisions_vehicle": 0.6,
    "collisions_layout": 0.65,
    "red_light": 0.7,
    "stop_infraction": 0.8,
    "scenario_timeouts": 0.7,
    "yield_emergency_vehicle_infractions": 0.7,
}
"""Multiplicative IS factor per event, by Bench2Drive JSON key. ``outside_route_lanes`` multiplies by
(1 - p/100) instead (p in percent); ``min_speed_infractions`` is not scored (Efficiency only)."""

INFRACTION_KEYS: tuple[str, ...] = (
    "collisions_layout", "collisions_pedestrian", "collisions_vehicle", "red_light", "stop_infraction",
    "outside_route_lanes", "min_speed_infractions", "yield_emergency_vehicle_infractions", "scenario_timeouts",
    "route_dev", "vehicle_blocked", "route_timeout",
)
"""Every key of a Bench2Drive record's ``infractions`` (each a list of message strings)."""

SCORED_KEYS: tuple[str, ...] = tuple(PENALTY) + ("outside_route_lanes",)
"""Keys that lower IS."""

PROTOCOLS = ("b2d", "b2d-star")
"""b2d: collisions are penalised, the route goes on. b2d-star: the first counted collision ends the route."""

COMFORT_BOUNDS: dict[str, tuple[float, float]] = {
    "lon_accel": (-4.05, 2.40),  # m/s^2
    "lat_accel": (-4.89, 4.89),  # m/s^2
    "jerk": (-8.37, 8.37),  # m/s^3, derivative of the acceleration magnitude
    "lon_jerk": (-4.13, 4.13),  # m/s^3
    "yaw_accel": (-1.93, 1.93),  # rad/s^2
    "yaw_rate": (-0.95, 0.95),  # rad/s
}
"""Open intervals every smoothed sample of a comfortable chunk must stay in (SI units, rad/s)."""

END_REASONS = ("completed", "collision", "route_deviation", "agent_blocked", "route_timeout", "tick_cap", "running")

_STATUS_FAILURE = {
    "collision": "Agent collided against an object",  # b2d-star only; not a Bench2Drive message
    "route_deviation": "Agent deviated from the route",
    "agent_blocked": "Agent got blocked",
    "route_timeout": "Agent timed out",
    "tick_cap": "TickRuntime",  # Bench2Drive's message when its 4000-tick (200 s) limit stops the route
}
CRASHED_STATUS = "Failed - Simulation crashed"

_ROUND_SCORE = 6  # leaderboard's ROUND_DIGITS_SCORE for IS and DS
_ROUND_META = 3  # leaderboard's ROUND_DIGITS
_CHECKPOINTS = 20  # efficiency checkpoints per route
_EFFICIENCY_CAP = 1000.0  # the efficiency script drops checkpoint values above this (percent)
_COMFORT_CHUNK = 20  # samples (2 s at 10 Hz)
_DT = 0.1  # s per logged step (10 Hz)


# ---------------------------------------------------------------------- the per-route log
@dataclass
class RouteLog:
    """Everything the metrics need about one route, built by the runner from the world's per-step events.

    Distances in metres, times in seconds, speeds in m/s, angles in rad. Per-step arrays are sampled at
    10 Hz (one entry per world step of ``dt = 0.1`` s; entry ``i`` is the state at the end of step ``i``,
    i.e. time ``(i + 1) * 0.1`` s); lists, numpy arrays and CPU tensors are accepted.
    """

    route_id: str
    """Route identifier, unique within the split (e.g. ``"RouteScenario_12_rep0"``)."""
    scenario_type: str
    """One of :data:`SCENARIO_TYPES` (other names are scored but belong to no ability)."""
    town_seed: int
    """Seed of the procedural town the route runs in."""
    route_length_m: float
    """Total route length (``WorldState.route_length``), m."""
    progress_m: float
    """Route metres passed at the end (``WorldState.progress``: the maximum, never decreases), m."""
    completed: bool
    """The world's completion rule fired (RC > 99 % and within 10 m of the last point); RC is then 100."""
    end_reason: str
    """``EndReason.NAMES`` value: completed, collision, route_deviation, agent_blocked, route_timeout,
    tick_cap, running (the runner stopped before the route ended)."""
    infractions: dict[str, list[dict]] = field(default_factory=dict)
    """Bench2Drive key -> one dict per counted event, each with ``t`` (s since the start, the event's
    step end time), ``x``, ``y`` (ego position, m). Collisions (``collisions_*``) also carry ``other_kind``
    (AgentKind name, e.g. ``"CAR"``) and should carry ``progress_m`` (route progress at the event) and may
    carry ``other_id`` (agent index), ``driven_m`` and ``outside_lanes_m`` (totals so far; used to cut a
    b2d log under b2d-star). Red lights may carry ``light_id``, stop infractions ``stop_id``. The runner
    fills ``collisions_pedestrian``, ``collisions_vehicle``, ``collisions_layout``, ``red_light``,
    ``stop_infraction`` and optionally timed ``scenario_timeouts`` / ``yield_emergency_vehicle_infractions``
    events (else the two flags below are used); other :data:`INFRACTION_KEYS` are accepted but ignored
    (outside lanes, min speed and the route-ending keys are derived from the fields below)."""
    driven_m: float = 0.0
    """Metres driven (``WorldState.driven``)."""
    outside_lanes_m: float = 0.0
    """Metres driven outside route lanes / in a wrong-direction lane (``WorldState.driven_outside``)."""
    outside_route_m: float | None = None
    """Route metres passed while outside route lanes / in a wrong-direction lane
    (``WorldState.progress_outside``): Bench2Drive's outside-lanes percentage is this over the route metres
    passed (``progress_m``). None (hand-made logs): ``outside_lanes_m`` over ``driven_m`` instead."""
    scenario_timeout: bool = False
    """The route's scenario was not passed within its 240 s (one ``scenario_timeouts`` factor 0.7)."""
    yield_emergency_failed: bool = False
    """At the scenario's end the ego was still ahead of the emergency vehicle (one factor 0.7)."""
    first_junction_progress_m: float | None = None
    """Route metres where the route's first junction starts (Traffic_Signs partial credit), or None."""
    kinematics: dict[str, Any] = field(default_factory=dict)
    """Per-step arrays for comfort: ``accel_lon`` (StepEvents.accel, m/s^2), ``accel_lat`` (m/s^2; the
    runner may use speed x yaw_rate), ``yaw_rate`` (StepEvents.yaw_rate, rad/s), optional ``speed`` (m/s)."""
    checkpoint_speeds: dict[str, Any] = field(default_factory=dict)
    """Per-step arrays for efficiency: ``ego_speed`` (m/s), ``background_speed_all`` (mean speed of every
    background vehicle of the world, NaN where there is none: Bench2Drive's rule), ``progress_m``
    (WorldState.progress after the step); optional ``background_speed`` (StepEvents.background_speed, moving
    vehicles within 50 m), used when ``background_speed_all`` is missing."""
    pose: dict[str, Any] = field(default_factory=dict)
    """Optional per-step ego ``x``, ``y`` (m) and ``yaw`` (rad), for the per-step file of the comfort tool."""
    duration_s: float | None = None
    """Simulated route duration, s (``meta.duration_game``); defaults to steps logged x 0.1 s."""
    duration_system_s: float = 0.0
    """Wall-clock seconds spent on the route (``meta.duration_system``); 0 if unknown."""
    extra_meta: dict[str, Any] = field(default_factory=dict)
    """Extra JSON-able keys copied into the record's ``meta`` (e.g. a long route's chained scenarios)."""
    scenario_name: str | None = None
    """Bench2Drive's ``scenario_name`` (``<Type>_<n>``); default ``<scenario_type>_<route number>``."""
    town_name: str | None = None
    """Bench2Drive's ``town_name``; default ``CraftTown<town_seed>``."""


# ---------------------------------------------------------------------- per-route scoring
def _check_log(log: RouteLog) -> None:
    if not isinstance(log, RouteLog):
        raise CraftError(f"score_route: expected a RouteLog, got {type(log).__name__}")
    if not (log.route_length_m > 0 and math.isfinite(log.route_length_m)):
        raise CraftError(f"RouteLog {log.route_id}: route_length_m must be positive, got {log.route_length_m}")
    if log.end_reason not in END_REASONS:
        raise CraftError(f"RouteLog {log.route_id}: end_reason {log.end_reason!r} is not one of {END_REASONS}")
    for key, events in log.infractions.items():
        if key not in INFRACTION_KEYS:
            raise CraftError(f"RouteLog {log.route_id}: unknown infraction key {key!r}; use one of {INFRACTION_KEYS}")
        for e in events:
            if not isinstance(e, dict) or "t" not in e:
                raise CraftError(f"RouteLog {log.route_id}: every {key} event must be a dict with 't', got {e!r}")


def route_completion(progress_m: float, route_length_m: float, completed: bool) -> float:
    """RC in [0, 100], rounded to 0.01: 100 if ``completed``, else progress / length x 100.

    Deviation: an incomplete route is capped at 99.99 (rounding 99.996 up to 100 would otherwise make an
    unfinished route count as completed).
    """
    if completed:
        return 100.0
    rc = 100.0 * max(0.0, float(progress_m)) / float(route_length_m)
    return min(round(rc, 2), 99.99)


def _event_counts(log: RouteLog, infractions: dict[str, list[dict]]) -> dict[str, int]:
    """Number of penalised events per PENALTY key. The two scenario flags count once each unless the
    runner also listed the events (then the list wins, so nothing is counted twice)."""
    counts = {k: len(infractions.get(k, [])) for k in PENALTY}
    if log.scenario_timeout and counts["scenario_timeouts"] == 0:
        counts["scenario_timeouts"] = 1
    if log.yield_emergency_failed and counts["yield_emergency_vehicle_infractions"] == 0:
        counts["yield_emergency_vehicle_infractions"] = 1
    return counts


def _outside_percent(outside_m: float, driven_m: float) -> float:
    """p = 100 x outside / driven, clamped to [0, 100]; 0 when nothing was driven."""
    if driven_m <= 0:
        return 0.0
    return min(100.0, max(0.0, 100.0 * outside_m / driven_m))


def _outside(log: RouteLog) -> tuple[float, float]:
    """(metres, percent) of Bench2Drive's outside-route-lanes infraction: route metres passed while outside
    route lanes / in a wrong-direction lane, and their share of the route metres passed (Bench2Drive's
    OutsideRouteLanesTest counts route distance, not distance driven). Hand-made logs without
    ``outside_route_m``: metres driven outside over metres driven."""
    if log.outside_route_m is None:
        return float(log.outside_lanes_m), _outside_percent(log.outside_lanes_m, log.driven_m)
    return float(log.outside_route_m), _outside_percent(log.outside_route_m, log.progress_m)


def infraction_score(counts: dict[str, int], outside_percent: float = 0.0) -> float:
    """IS = product of PENALTY[key] ** count x (1 - p/100) (unrounded)."""
    score = 1.0
    for key, n in counts.items():
        if key not in PENALTY:
            raise CraftError(f"infraction_score: {key!r} has no penalty; use one of {tuple(PENALTY)}")
        score *= PENALTY[key] ** int(n)
    return score * (1.0 - outside_percent / 100.0)


def _series(d: dict, key: str, n: int | None = None) -> np.ndarray | None:
    if key not in d or d[key] is None:
        return None
    a = np.asarray(d[key], dtype=np.float64).reshape(-1)
    return a if n is None else a[:n]


def _cut_star(log: RouteLog) -> tuple[RouteLog, bool]:
    """Apply b2d-star to a log: end the route at the first counted collision. Returns (log, cut?).

    The cut progress is the event's ``progress_m``; without it, ``checkpoint_speeds['progress_m']`` at the
    event's step (index round(t / 0.1) - 1); without either, a CraftError. Events after the collision are
    dropped, per-step arrays are truncated at it, and ``driven_m`` / ``outside_lanes_m`` are taken from the
    event when it carries them (otherwise the route totals are kept: a b2d log has no per-step distances).
    The scenario flags follow :func:`_flag_until`. A log the world already ended under b2d-star
    (end_reason "collision") is returned as is.
    """
    cols = [e for k in ("collisions_pedestrian", "collisions_vehicle", "collisions_layout")
            for e in log.infractions.get(k, [])]
    if not cols or log.end_reason == "collision":
        return log, False
    first = min(cols, key=lambda e: float(e["t"]))
    t0 = float(first["t"])
    step = max(0, int(round(t0 / _DT)) - 1)
    if "progress_m" in first:
        prog = float(first["progress_m"])
    else:
        p = _series(log.checkpoint_speeds, "progress_m")
        if p is None or len(p) == 0:
            raise CraftError(
                f"RouteLog {log.route_id}: b2d-star needs the first collision's progress_m (in the event or in "
                "checkpoint_speeds['progress_m'])"
            )
        prog = float(p[min(step, len(p) - 1)])
    if log.completed and prog >= log.route_length_m:
        return log, False  # completion came first (the world ranks COMPLETED above COLLISION)
    n = step + 1
    infr = {k: [e for e in v if float(e["t"]) <= t0 + 1e-9] for k, v in log.infractions.items()}
    cut = RouteLog(
        **{**log.__dict__,
           "progress_m": min(prog, log.progress_m),
           "completed": False,
           "end_reason": "collision",
           "infractions": infr,
           "driven_m": float(first.get("driven_m", log.driven_m)),
           "outside_lanes_m": float(first.get("outside_lanes_m", log.outside_lanes_m)),
           "outside_route_m": (None if log.outside_route_m is None
                               else float(first.get("outside_route_m", log.outside_route_m))),
           "scenario_timeout": _flag_until(log, "scenario_timeouts", log.scenario_timeout, infr),
           "yield_emergency_failed": _flag_until(log, "yield_emergency_vehicle_infractions",
                                                 log.yield_emergency_failed, infr),
           "kinematics": {k: _series(log.kinematics, k, n) for k in log.kinematics},
           "checkpoint_speeds": {k: _series(log.checkpoint_speeds, k, n) for k in log.checkpoint_speeds},
           "pose": {k: _series(log.pose, k, n) for k in log.pose},
           "duration_s": min(t0, log.duration_s) if log.duration_s is not None else t0}
    )
    return cut, True


def protocol_log(log: RouteLog, protocol: str) -> RouteLog:
    """The log as ``protocol`` sees it: b2d-star cuts it at the first counted collision (:func:`_cut_star`)."""
    if protocol not in PROTOCOLS:
        raise CraftError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return _cut_star(log)[0] if protocol == "b2d-star" else log


def _flag_until(log: RouteLog, key: str, flag: bool, cut_infractions: dict) -> bool:
    """A scenario flag after a b2d-star cut: if the runner listed timed events under ``key``, the flag
    holds only if one of them is before the cut; otherwise (no times known) the flag is kept."""
    if log.infractions.get(key):
        return bool(cut_infractions.get(key))
    return flag


def _xy(e: dict) -> str:
    return f"(x={float(e.get('x', 0.0)):.3f}, y={float(e.get('y', 0.0)):.3f}, z=0.000)"


def _messages(log: RouteLog, counts: dict[str, int], eff_values: list[float]) -> dict[str, list[str]]:
    """Bench2Drive's infraction strings (same wording as the CARLA criteria, so its tools can parse them:
    outside_route_lanes' metres are the 9th word; min_speed's percentage is the only ``N%`` token)."""
    out: dict[str, list[str]] = {k: [] for k in INFRACTION_KEYS}
    for key in ("collisions_layout", "collisions_pedestrian", "collisions_vehicle"):
        for e in log.infractions.get(key, []):
            out[key].append(
                f"Agent collided against object with type={e.get('other_kind', 'unknown')} and "
                f"id={e.get('other_id', -1)} at {_xy(e)}"
            )
    for e in log.infractions.get("red_light", []):
        out["red_light"].append(f"Agent ran a red light {e.get('light_id', -1)} at {_xy(e)}")
    for e in log.infractions.get("stop_infraction", []):
        out["stop_infraction"].append(f"Agent ran a stop with id={e.get('stop_id', -1)} at {_xy(e)}")
    for key, text in (("scenario_timeouts", "Agent timed out a scenario"),
                      ("yield_emergency_vehicle_infractions", "Agent failed to yield to an emergency vehicle")):
        events = log.infractions.get(key, [])
        out[key] = [f"{text} at {_xy(e)}" for e in events] or [text] * counts[key]
    metres, p = _outside(log)
    if metres > 0:
        out["outside_route_lanes"].append(
            f"Agent went outside its route lanes for about {round(metres, 3)} meters ({round(p, 2)}% of the "
            "completed route)"
        )
    for v in eff_values:
        out["min_speed_infractions"].append(f"Average speed is {v}% of the surrounding traffic's one")
    if log.end_reason == "route_deviation":
        out["route_dev"].append(f"Agent deviated from the route at {_xy(_last_xy(log))}")
    elif log.end_reason == "agent_blocked":
        out["vehicle_blocked"].append(f"Agent got blocked at {_xy(_last_xy(log))}")
    elif log.end_reason == "route_timeout":
        out["route_timeout"].append("Route timeout.")
    # tick_cap: Bench2Drive stops the route with its tick-limit error: no infraction entry (status only)
    return out


def _last_xy(log: RouteLog) -> dict:
    x, y = _series(log.pose, "x"), _series(log.pose, "y")
    if x is None or y is None or len(x) == 0:
        return {}
    return {"x": float(x[-1]), "y": float(y[-1])}


WEATHER_ID = "clear"
"""``weather_id`` of every record: CRAFT's world has no weather (Bench2Drive writes the id of its CARLA weather)."""


def route_number_of(route_id: str) -> int:
    """The integer of a ``RouteScenario_<int>_rep<k>`` route id (how Bench2Drive's tools match records to
    routes); CraftError for another form."""
    parts = str(route_id).split("_")
    if len(parts) != 3 or parts[0] != "RouteScenario" or not parts[1].isdigit() or not parts[2].startswith("rep") \
            or not parts[2][3:].isdigit():
        raise CraftError(f"route_id {route_id!r} is not of the form RouteScenario_<int>_rep<k>")
    return int(parts[1])


def _names(route_id: str, scenario_type: str, town_seed: int, scenario_name: str | None,
           town_name: str | None) -> dict:
    """Bench2Drive's naming fields of a record."""
    try:
        num = route_number_of(route_id)
    except CraftError:
        num = 0
    scen = scenario_name or f"{scenario_type}_{num}"
    town = town_name or f"CraftTown{int(town_seed)}"
    return {"scenario_name": scen, "weather_id": WEATHER_ID, "save_name": f"{route_id}_{town}_{scen}_{WEATHER_ID}",
            "town_name": town}


def score_route(log: RouteLog, protocol: str = "b2d", index: int = -1) -> dict:
    """Score one route; returns its Bench2Drive JSON record.

    RC: :func:`route_completion` (under ``b2d-star``, up to the first counted collision, see
    :func:`_cut_star`). IS: product of :data:`PENALTY` per event x (1 - p/100), p = 100 x outside_lanes_m /
    driven_m. DS = RC x IS. IS and DS rounded to 6 digits as the leaderboard does.

    Status (Bench2Drive's strings): ``"Perfect"`` (RC 100 and no infraction string at all, min-speed
    records included, as the leaderboard counts), ``"Completed"`` (RC 100), otherwise ``"Failed"`` plus
    ``" - Agent deviated from the route"`` / ``" - Agent got blocked"`` / ``" - Agent timed out"``
    (route timeout and tick cap) / ``" - Agent collided against an object"`` (b2d-star only, CRAFT's
    wording); :func:`crashed_record` gives ``"Failed - Simulation crashed"`` for routes that did not run.

    Record (Bench2Drive's leaderboard fields first): ``index``, ``route_id`` (``RouteScenario_<int>_rep<k>``),
    ``scenario_name`` (``<Type>_<n>``), ``weather_id``, ``save_name`` (``<route_id>_<town_name>_<scenario_name>_
    <weather_id>``: the folder of the route's per-step file; Bench2Drive appends a time stamp, left out so that
    records are reproducible), ``town_name``, ``status``, ``num_infractions``, ``infractions {key: [strings]}``
    (all of :data:`INFRACTION_KEYS`), ``scores {score_route, score_penalty, score_composed}``, ``meta
    {route_length, duration_game, duration_system, ...}``; then CRAFT's ``scenario_type`` and ``town_seed``.
    CRAFT's meta keys: protocol, end_reason, success, progress, driven, outside_lanes (metres driven outside),
    outside_route (route metres passed outside), first_junction_progress, efficiency, comfort (Bench2Drive's
    computation), comfort_si (CRAFT's consistent one).
    """
    if protocol not in PROTOCOLS:
        raise CraftError(f"score_route: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    _check_log(log)
    if protocol == "b2d-star":
        log, _ = _cut_star(log)
    rc = route_completion(log.progress_m, log.route_length_m, log.completed)
    counts = _event_counts(log, log.infractions)
    _, p_out = _outside(log)
    score_is = infraction_score(counts, p_out)
    eff_route, eff_values = _efficiency_values(log)
    infr = _messages(log, counts, eff_values)
    num = sum(len(v) for v in infr.values())
    if rc >= 100.0:
        status = "Completed" if num > 0 else "Perfect"
    else:
        status = "Failed"
        if log.end_reason in _STATUS_FAILURE:
            status += " - " + _STATUS_FAILURE[log.end_reason]
    n_steps = max((len(np.asarray(v).reshape(-1)) for v in list(log.kinematics.values())
                   + list(log.checkpoint_speeds.values()) if v is not None), default=0)
    duration = log.duration_s if log.duration_s is not None else n_steps * _DT
    record = {
        "index": int(index),
        "route_id": str(log.route_id),
        **_names(log.route_id, log.scenario_type, log.town_seed, log.scenario_name, log.town_name),
        "status": status,
        "num_infractions": num,
        "scores": {
            "score_route": rc,
            "score_penalty": round(score_is, _ROUND_SCORE),
            "score_composed": round(max(rc * score_is, 0.0), _ROUND_SCORE),
        },
        "infractions": infr,
        "meta": {
            "route_length": round(float(log.route_length_m), _ROUND_META),
            "duration_game": round(float(duration), _ROUND_META),
            "duration_system": round(float(log.duration_system_s), _ROUND_META),
            "protocol": protocol,
            "end_reason": log.end_reason,
            "success": False,
            "progress": round(float(log.progress_m), _ROUND_META),
            "driven": round(float(log.driven_m), _ROUND_META),
            "outside_lanes": round(float(log.outside_lanes_m), _ROUND_META),
            "first_junction_progress": (None if log.first_junction_progress_m is None
                                        else float(log.first_junction_progress_m)),
            "outside_route": round(_outside(log)[0], _ROUND_META),
            "efficiency": eff_route,
            "comfort": comfort(log),
            "comfort_si": comfort_si(log),
            **log.extra_meta,
        },
        "scenario_type": log.scenario_type,
        "town_seed": int(log.town_seed),
    }
    record["meta"]["success"] = is_success(record)
    return record


def crashed_record(route_id: str, scenario_type: str, town_seed: int, route_length_m: float = 0.0,
                   index: int = -1, protocol: str = "b2d") -> dict:
    """The record of a route that could not be run (``"Failed - Simulation crashed"``, all scores 0)."""
    return {
        "index": int(index), "route_id": str(route_id), **_names(route_id, scenario_type, town_seed, None, None),
        "status": CRASHED_STATUS, "scenario_type": scenario_type, "town_seed": int(town_seed),
        "num_infractions": 0,
        "scores": {"score_route": 0.0, "score_penalty": 0.0, "score_composed": 0.0},
        "infractions": {k: [] for k in INFRACTION_KEYS},
        "meta": {"route_length": round(float(route_length_m), _ROUND_META), "duration_game": 0.0,
                 "duration_system": 0.0, "protocol": protocol, "end_reason": "crashed", "success": False,
                 "progress": 0.0, "driven": 0.0, "outside_lanes": 0.0, "outside_route": 0.0,
                 "first_junction_progress": None,
                 "efficiency": None, "comfort": None, "comfort_si": None},
    }


def is_success(record: dict) -> bool:
    """Bench2Drive's success (merge_route_json.py): status Completed / Perfect (RC = 100) and no
    infraction string under any key except ``min_speed_infractions``."""
    if record["scores"]["score_route"] < 100.0 or record["status"] not in ("Completed", "Perfect"):
        return False
    return not any(v for k, v in record["infractions"].items() if k != "min_speed_infractions")


# ---------------------------------------------------------------------- efficiency
def _checkpoint_value(ego_sum: float, bg_sum: float, n: int) -> float:
    """One checkpoint's value as the leaderboard writes it: round(100 x mean ego / mean background, 2), or the
    integer 100 when no step of the checkpoint had background vehicles (or they all stood still)."""
    if n > 0 and bg_sum:
        return round((ego_sum / n) / (bg_sum / n) * 100, 2)
    return 100


def _efficiency_values(log: RouteLog) -> tuple[float | None, list[float]]:
    """(route value, per-checkpoint values) of :func:`efficiency`."""
    cs = log.checkpoint_speeds
    bg_key = "background_speed_all" if _series(cs, "background_speed_all") is not None else "background_speed"
    ego, bg, prog = (_series(cs, k) for k in ("ego_speed", bg_key, "progress_m"))
    if ego is None or prog is None or len(ego) == 0:
        return None, []
    n = min(len(ego), len(prog), len(bg) if bg is not None else len(ego))
    ego, prog = np.abs(ego[:n]), np.maximum.accumulate(np.maximum(prog[:n], 0.0))
    bg = bg[:n] if bg is not None else np.full(n, np.nan)
    seg = float(log.route_length_m) / _CHECKPOINTS
    has = np.isfinite(bg)
    ego_c = np.concatenate([[0.0], np.cumsum(np.where(has, ego, 0.0))])  # prefix sums over the steps
    bg_c = np.concatenate([[0.0], np.cumsum(np.where(has, bg, 0.0))])
    cnt_c = np.concatenate([[0], np.cumsum(has)])
    values: list = []
    first, current = 0, 0.0  # first step of the open checkpoint; route metres where it began
    while True:
        # the step whose progress first exceeds the open checkpoint by more than one checkpoint length closes
        # it before its own sample is added (MinimumSpeedRouteTest.update)
        t = int(np.searchsorted(prog, current + seg, side="right"))
        if values:
            t = max(t, first + 1)  # one checkpoint per step at most
        if t >= n:
            break
        values.append(_checkpoint_value(ego_c[t] - ego_c[first], bg_c[t] - bg_c[first], int(cnt_c[t] - cnt_c[first])))
        first, current = t, float(prog[t])
    if prog[-1] / float(log.route_length_m) > 0.95:  # the last, partly passed checkpoint (terminate())
        values.append(_checkpoint_value(ego_c[n] - ego_c[first], bg_c[n] - bg_c[first], int(cnt_c[n] - cnt_c[first])))
    kept = [v for v in values if v <= _EFFICIENCY_CAP]
    return (float(np.mean(kept)) if kept else None), values


def efficiency(log: RouteLog) -> float | None:
    """Bench2Drive's driving efficiency of one route, percent (may exceed 100), as its leaderboard's
    MinimumSpeedRouteTest and its efficiency script compute it.

    The route (``route_length_m``) has 20 checkpoints of equal length. Every step with background vehicles
    (a finite ``background_speed_all``: the mean speed of *every* background vehicle of the world) adds the
    ego speed and that mean to the open checkpoint. The checkpoint closes at the first step whose route
    progress exceeds the checkpoint's start by more than one checkpoint length (only fully passed
    checkpoints count; the next one starts at that step's progress), giving 100 x ego sum / background sum
    rounded to 2 digits (the integer 100 when it had no such step). When the route ends beyond 95 % of its
    length the open checkpoint is closed too. Route value = mean of the checkpoint values <= 1000 (the
    efficiency script drops larger ones); None if there are none (a route stopped before its first
    checkpoint has no efficiency, and the efficiency script leaves it out).
    """
    return _efficiency_values(log)[0]


# ---------------------------------------------------------------------- comfort
def savgol(y, window: int = 7, order: int = 2, deriv: int = 0, delta: float = 1.0) -> np.ndarray:
    """Savitzky-Golay filter (numpy), equal to ``scipy.signal.savgol_filter(..., mode="interp")``.

    Each sample is the value (or ``deriv``-th derivative, per unit ``delta``) at its position of the
    least-squares polynomial of degree ``order`` fitted to the ``window`` samples centred on it; the first
    and last ``window // 2`` samples use the polynomial of the first / last full window. A polynomial of
    degree <= ``order`` is reproduced exactly. ``window`` must be odd, > ``order`` and <= len(y).
    """
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    n = len(y)
    if window % 2 != 1 or window <= order or window > n:
        raise CraftError(f"savgol: need an odd window > order ({order}) and <= {n} samples, got {window}")
    h = window // 2
    x = np.arange(window, dtype=np.float64) - h
    vander = np.vander(x, order + 1, increasing=True)  # (w, order+1): x^k
    fit = np.linalg.pinv(vander)  # coefficients c = fit @ window samples
    dmat = np.zeros_like(vander)  # d^deriv/dx^deriv of x^k at each window position
    for k in range(deriv, order + 1):
        dmat[:, k] = math.perm(k, deriv) * x ** (k - deriv)
    ev = dmat @ fit / (delta**deriv)  # (w, w): row j evaluates at window position j
    out = np.empty(n)
    out[h:n - h] = np.lib.stride_tricks.sliding_window_view(y, window) @ ev[h]
    out[:h] = ev[:h] @ y[:window]
    out[n - h:] = ev[window - h:] @ y[n - window:]
    return out


def _chunk_comfortable(lon: np.ndarray, lat: np.ndarray, yaw_rate: np.ndarray) -> bool:
    """Bench2Drive's compute_comfort_metric on one chunk (window 7, order 2, 10 Hz, smooth then derive)."""
    n = len(lon)
    w = min(7, n)
    w = w if w % 2 else w - 1
    if w <= 2:
        raise CraftError(f"comfort: a chunk needs at least 3 samples, got {n}")
    mag = np.hypot(lon, lat)
    lon_s, lat_s, mag_s, yaw_s = (savgol(s, w, 2) for s in (lon, lat, mag, yaw_rate))
    jerk = savgol(mag_s, w, 2, deriv=1, delta=_DT)
    lon_jerk = savgol(lon_s, w, 2, deriv=1, delta=_DT)
    # Deviation: the original script's "yaw acceleration" is the smoothed yaw rate (in deg/s); we use its
    # derivative (rad/s^2), smoothed first like the jerks.
    yaw_acc = savgol(yaw_s, w, 2, deriv=1, delta=_DT)
    signals = {"lon_accel": lon_s, "lat_accel": lat_s, "jerk": jerk, "lon_jerk": lon_jerk,
               "yaw_accel": yaw_acc, "yaw_rate": yaw_s}
    return all(bool(np.all((s > COMFORT_BOUNDS[k][0]) & (s < COMFORT_BOUNDS[k][1]))) for k, s in signals.items())



def _comfort_series(log):
    """The route's longitudinal / lateral acceleration and yaw rate cut to a common length ``n``
    (lateral zeros when not logged); None when fewer than 3 samples were logged."""
    k = log.kinematics
    lon, lat, yaw = (_series(k, name) for name in ("accel_lon", "accel_lat", "yaw_rate"))
    if lon is None or yaw is None:
        return None
    n = min(len(lon), len(yaw), len(lat) if lat is not None else len(lon))
    if n < 3:
        return None
    return lon[:n], (lat[:n] if lat is not None else np.zeros(n)), yaw[:n]

def comfort_si(log: RouteLog) -> float | None:
    """CRAFT's physically consistent comfort: share of comfortable 2 s chunks of the route, in [0, 1]
    (the ``comfort_si`` key; :func:`comfort` is Bench2Drive's own computation).

    ``kinematics['accel_lon']``, ``['accel_lat']`` (m/s^2) and ``['yaw_rate']`` (rad/s), 10 Hz, are cut
    into non-overlapping 20-sample chunks (an incomplete last chunk is ignored; a route of at most 20
    samples is one chunk). Each signal is Savitzky-Golay smoothed (window 7, order 2); jerk is the
    derivative of the smoothed acceleration magnitude, longitudinal jerk that of the smoothed longitudinal
    acceleration, yaw acceleration that of the smoothed yaw rate. A chunk is comfortable if every sample is
    inside all six :data:`COMFORT_BOUNDS` (strict). Units: rad/s consistently (the original script mixes
    deg/s with rad/s bounds). None when fewer than 3 samples were logged.
    """
    series = _comfort_series(log)
    if series is None:
        return None
    lon, lat, yaw = series
    n = len(lon)
    if n <= _COMFORT_CHUNK:
        return 1.0 if _chunk_comfortable(lon, lat, yaw) else 0.0
    res = [_chunk_comfortable(lon[i:i + _COMFORT_CHUNK], lat[i:i + _COMFORT_CHUNK], yaw[i:i + _COMFORT_CHUNK])
           for i in range(0, n - _COMFORT_CHUNK + 1, _COMFORT_CHUNK)]
    return sum(res) / len(res)


def _unwrap(headings: np.ndarray) -> np.ndarray:
    """Bench2Drive's phase unwrap (it applies it to the yaw rate, in deg/s, with a 2 pi period)."""
    adj = np.zeros_like(headings)
    adj[1:] = np.cumsum(np.round(np.diff(headings) / (2 * np.pi)))
    return headings - 2 * np.pi * adj


def _chunk_comfortable_b2d(lon: np.ndarray, lat: np.ndarray, yaw_rate_deg: np.ndarray) -> bool:
    """Bench2Drive's compute_comfort_metric on one chunk, its unit handling included: the yaw rate arrives
    in deg/s (CARLA's angular velocity) and is checked against the rad/s bounds, and its "yaw acceleration"
    is the smoothed yaw rate itself (no derivative)."""
    n = len(lon)
    w = min(7, n)
    if w <= 2:
        raise CraftError(f"comfort: a chunk needs at least 3 samples, got {n}")
    if w % 2 == 0:  # Bench2Drive's scipy accepts an even window; ours needs an odd one (routes < 7 samples only)
        w -= 1
    yaw = _unwrap(yaw_rate_deg)
    yaw_s = savgol(yaw, w, 2)
    lon_s, lat_s, mag_s = (savgol(x, w, 2) for x in (lon, lat, np.hypot(lon, lat)))
    signals = {"lon_accel": lon_s, "lat_accel": lat_s, "jerk": savgol(mag_s, w, 2, deriv=1, delta=_DT),
               "lon_jerk": savgol(lon_s, w, 2, deriv=1, delta=_DT), "yaw_accel": yaw_s, "yaw_rate": yaw_s}
    return all(bool(np.all((x > COMFORT_BOUNDS[k][0]) & (x < COMFORT_BOUNDS[k][1]))) for k, x in signals.items())


def comfort(log: RouteLog) -> float | None:
    """Bench2Drive's comfort (smoothness) of one route, in [0, 1], as its efficiency_smoothness_benchmark.py
    computes it from the per-step file: 20-sample chunks (a route of at most 20 samples is one chunk, an
    incomplete last chunk is dropped), Savitzky-Golay window 7, order 2, and its unit handling — the yaw
    rate in deg/s against the 0.95 bound meant for rad/s, the smoothed yaw rate (deg/s) as the yaw
    acceleration against 1.93. Almost any turn therefore makes a chunk uncomfortable; :func:`comfort_si`
    is the physically consistent variant. None when fewer than 3 samples were logged."""
    series = _comfort_series(log)
    if series is None:
        return None
    lon, lat, yaw = series
    n = len(lon)
    yaw = np.degrees(yaw)
    if n <= _COMFORT_CHUNK:
        return 1.0 if _chunk_comfortable_b2d(lon, lat, yaw) else 0.0
    res = [_chunk_comfortable_b2d(lon[i:i + _COMFORT_CHUNK], lat[i:i + _COMFORT_CHUNK], yaw[i:i + _COMFORT_CHUNK])
           for i in range(0, n - _COMFORT_CHUNK + 1, _COMFORT_CHUNK)]
    return sum(res) / len(res)


# ---------------------------------------------------------------------- aggregate
def _crashed(record: dict) -> bool:
    return "Simulation crashed" in record.get("status", "")


def _traffic_signs_credit(record: dict) -> bool:
    """Partial credit (ability_benchmark.py): route metres reached (RC x length) >= first junction + 8 m,
    and no red_light / stop_infraction. Routes without a known junction get none."""
    junction = record["meta"].get("first_junction_progress")
    if junction is None:
        return False
    reached = record["scores"]["score_route"] / 100.0 * record["meta"]["route_length"]
    return (reached >= float(junction) + 8.0 and not record["infractions"]["red_light"]
            and not record["infractions"]["stop_infraction"])


def _outside_km(record: dict) -> float:
    msgs = record["infractions"].get("outside_route_lanes", [])
    if not msgs:
        return 0.0
    return float(msgs[0].split(" ")[8]) / 1000.0  # the leaderboard reads the metres from the message


def aggregate(records: list[dict], num_routes: int, protocol: str = "b2d", split: str = "",
              town_seeds=(), policy: str = "") -> dict:
    """The benchmark summary over route records (from :func:`score_route` / :func:`crashed_record`, or
    loaded from a results file).

    - ``DS``: sum of score_composed / ``num_routes`` (missing and crashed routes count 0); ``SR``: percent
      of ``num_routes`` that are successes (:func:`is_success`).
    - ``RC``, ``IS``: means over the records present that did not crash (None if none).
    - ``efficiency``: mean of the route values that exist; ``comfort``: mean route value x 100 (None if none).
    - ``abilities``: percent success over the records (crashed ones count as failures, missing ones are
      not counted, as in ability_benchmark.py) whose type belongs to the ability; Traffic_Signs also
      credits a failed route that passed its first junction + 8 m with no red-light / stop infraction.
      An ability without routes is None; ``Mean`` averages the abilities that are not None.
    - ``infractions_per_km``: per :data:`INFRACTION_KEYS`, count / km, km = sum(route_length x RC/100) /
      1000 over the records (at least 0.001), as the leaderboard's global record; ``outside_route_lanes``
      is, like there, the total km driven outside route lanes (not divided).
    """
    if num_routes < len(records) or num_routes <= 0:
        raise CraftError(f"aggregate: num_routes ({num_routes}) must be positive and >= len(records) ({len(records)})")
    if protocol not in PROTOCOLS:
        raise CraftError(f"aggregate: protocol must be one of {PROTOCOLS}, got {protocol!r}")
    ran = [r for r in records if not _crashed(r)]
    success = [is_success(r) for r in records]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731

    abilities: dict[str, float | None] = {}
    for ability, types in ABILITIES.items():
        hits = [s or (ability == "Traffic_Signs" and _traffic_signs_credit(r))
                for r, s in zip(records, success) if r["scenario_type"] in types]
        abilities[ability] = 100.0 * sum(hits) / len(hits) if hits else None
    present = [v for v in abilities.values() if v is not None]
    abilities["Mean"] = float(np.mean(present)) if present else None

    km = max(sum(r["meta"]["route_length"] / 1000.0 * r["scores"]["score_route"] / 100.0 for r in records), 0.001)
    per_km = {}
    for key in INFRACTION_KEYS:
        if key == "outside_route_lanes":
            per_km[key] = round(sum(_outside_km(r) for r in records), _ROUND_META)
        else:
            per_km[key] = round(sum(len(r["infractions"].get(key, [])) for r in records) / km, _ROUND_META)

    eff = [r["meta"].get("efficiency") for r in ran]
    com = [r["meta"].get("comfort") for r in ran]
    com_mean = mean([c for c in com if c is not None])
    com_si = mean([c for c in (r["meta"].get("comfort_si") for r in ran) if c is not None])
    return {
        "DS": sum(r["scores"]["score_composed"] for r in records) / num_routes,
        "SR": 100.0 * sum(success) / num_routes,
        "RC": mean([r["scores"]["score_route"] for r in ran]),
        "IS": mean([r["scores"]["score_penalty"] for r in ran]),
        "efficiency": mean([e for e in eff if e is not None]),
        "comfort": None if com_mean is None else 100.0 * com_mean,
        "comfort_si": None if com_si is None else 100.0 * com_si,
        "abilities": abilities,
        "infractions_per_km": per_km,
        "num_routes": int(num_routes),
        "protocol": protocol,
        "split": split,
        "town_seeds": [int(s) for s in town_seeds],
        "policy": policy,
    }


# ---------------------------------------------------------------------- results file
SUMMARY_KEYS = ("DS", "SR", "RC", "IS", "efficiency", "comfort", "comfort_si", "abilities", "infractions_per_km",
                "num_routes", "protocol", "split", "town_seeds", "policy")
ABILITY_KEYS = tuple(ABILITIES) + ("Mean",)
B2D_RECORD_KEYS = ("index", "route_id", "scenario_name", "weather_id", "save_name", "town_name", "status",
                   "num_infractions", "infractions", "scores", "meta")
"""A Bench2Drive leaderboard route record's fields (statistics_manager.py's RouteRecord)."""
RECORD_KEYS = B2D_RECORD_KEYS + ("scenario_type", "town_seed")


B2D_LABELS = ("Avg. driving score", "Avg. route completion", "Avg. infraction penalty", "Collisions with pedestrians",
              "Collisions with vehicles", "Collisions with layout", "Red lights infractions", "Stop sign infractions",
              "Off-road infractions", "Route deviations", "Route timeouts", "Agent blocked",
              "Yield emergency vehicles infractions", "Scenario timeouts", "Min speed infractions")
"""The leaderboard's ``labels`` (the order of ``values``)."""
_LABEL_KEYS = ("collisions_pedestrian", "collisions_vehicle", "collisions_layout", "red_light", "stop_infraction",
               "outside_route_lanes", "route_dev", "route_timeout", "vehicle_blocked",
               "yield_emergency_vehicle_infractions", "scenario_timeouts", "min_speed_infractions")
SENSORS = ["craft_world_state"]
"""The results file's ``sensors``: CRAFT's drivers read the batched world state (no CARLA sensor)."""


def global_record(records: list[dict], num_routes: int) -> dict:
    """The leaderboard's ``_checkpoint.global_record`` (statistics_manager.compute_global_statistics): score
    means over ``num_routes`` and their sample standard deviations, infractions per km driven (route length
    x RC; outside_route_lanes: total km outside), total length / durations, the failed routes as
    ``exceptions`` [route_id, index, status], and the worst status (Perfect > Completed > Failed)."""
    keys = ("score_composed", "score_route", "score_penalty")
    mean = {k: round(sum(r["scores"][k] for r in records) / num_routes, _ROUND_SCORE) for k in keys}
    if num_routes == 1:
        std = {k: 0 for k in keys}
    else:
        std = {k: round(math.sqrt(sum((r["scores"][k] - mean[k]) ** 2 for r in records) / (num_routes - 1)),
                        _ROUND_META) for k in keys}
    km = max(sum(r["meta"]["route_length"] / 1000 * r["scores"]["score_route"] / 100 for r in records), 0.001)
    infr = {}
    for key in INFRACTION_KEYS:
        if key == "outside_route_lanes":
            infr[key] = round(sum(_outside_km(r) for r in records), _ROUND_META)
        else:
            infr[key] = round(sum(len(r["infractions"][key]) for r in records) / km, _ROUND_META)
    status, exceptions = "Perfect", []
    for r in records:
        if "Failed" in r["status"]:
            exceptions.append([r["route_id"], r["index"], r["status"]])
            status = "Failed"
        elif status == "Perfect" and r["status"] != "Perfect":
            status = r["status"]
    return {"index": -1, "route_id": -1, "status": status, "infractions": infr, "scores_mean": mean,
            "scores_std_dev": std,
            "meta": {"total_length": round(sum(r["meta"]["route_length"] for r in records), _ROUND_META),
                     "duration_game": round(sum(r["meta"]["duration_game"] for r in records), _ROUND_META),
                     "duration_system": round(sum(r["meta"]["duration_system"] for r in records), _ROUND_META),
                     "exceptions": exceptions}}


def results_json(summary: dict, records: list[dict]) -> dict:
    """The results file in the leaderboard's layout plus CRAFT's summary.

    ``_checkpoint {global_record, progress [records, num_routes], records}``, ``entry_status`` ("Finished";
    "Crashed" when a record says the simulation crashed), ``eligible``, ``sensors``, ``values`` (strings, in
    :data:`B2D_LABELS` order), ``labels``; then CRAFT's ``summary`` and ``records`` (the same records,
    re-indexed 0..n-1 in order; Bench2Drive's tools read ``_checkpoint.records``).
    """
    recs = [{**r, "index": i} for i, r in enumerate(records)]
    n = int(summary.get("num_routes", len(recs)))
    g = global_record(recs, n)
    crashed = any("Simulation crashed" in r["status"] for r in recs)
    entry = "Crashed" if crashed else "Finished"
    values = [str(g["scores_mean"][k]) for k in ("score_composed", "score_route", "score_penalty")]
    values += [str(g["infractions"][k]) for k in _LABEL_KEYS]
    out = {"_checkpoint": {"global_record": g, "progress": [len(recs), n], "records": recs},
           "entry_status": entry, "eligible": entry == "Finished", "sensors": list(SENSORS), "values": values,
           "labels": list(B2D_LABELS), "summary": summary, "records": recs}
    validate_results(out)
    return out


def load_results(path) -> dict:
    """Read and check a results file; a file of another layout (an older CRAFT version, another tool's)
    gives one CraftError line naming the file and the first missing or malformed field."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise CraftError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CraftError(f"results file {path} is not readable JSON ({e})") from None
    try:
        validate_results(obj)
    except CraftError as e:
        raise CraftError(f"{path}: {e} (not a results file of this layout; re-run craft eval)") from None
    return obj


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_results(obj) -> None:
    """Check the layout of a results object; raise CraftError naming the first problem."""
    def fail(where: str, what: str):
        raise CraftError(f"results: {where} {what}")

    if not isinstance(obj, dict):
        fail("top level", f"must be an object, got {type(obj).__name__}")
    for key in ("_checkpoint", "entry_status", "eligible", "sensors", "values", "labels", "summary", "records"):
        if key not in obj:
            fail("top level", f"is missing {key!r}")
    s = obj["summary"]
    if not isinstance(s, dict):
        fail("summary", "must be an object")
    for key in SUMMARY_KEYS:
        if key not in s:
            fail("summary", f"is missing {key!r}")
    for key in ("DS", "SR", "num_routes"):
        if not _num(s[key]):
            fail(f"summary.{key}", f"must be a number, got {s[key]!r}")
    for key in ("DS", "SR"):
        if not (math.isfinite(s[key]) and 0 <= s[key] <= 100):
            fail(f"summary.{key}", f"must be a finite number in [0, 100], got {s[key]!r}")
    if "wall_time_s" in s and not (_num(s["wall_time_s"]) and math.isfinite(s["wall_time_s"])
                                   and s["wall_time_s"] >= 0):
        fail("summary.wall_time_s", f"must be a finite number of seconds >= 0, got {s['wall_time_s']!r}")
    for key in ("RC", "IS", "efficiency", "comfort", "comfort_si"):
        if s[key] is not None and not _num(s[key]):
            fail(f"summary.{key}", f"must be a number or null, got {s[key]!r}")
    if not isinstance(s["abilities"], dict):
        fail("summary.abilities", "must be an object")
    for key in ABILITY_KEYS:
        if key not in s["abilities"]:
            fail("summary.abilities", f"is missing {key!r}")
    if not isinstance(s["infractions_per_km"], dict):
        fail("summary.infractions_per_km", "must be an object")
    for key in INFRACTION_KEYS:
        if key not in s["infractions_per_km"]:
            fail("summary.infractions_per_km", f"is missing {key!r}")
    if not isinstance(obj["records"], list):
        fail("records", "must be a list")
    if s["num_routes"] != len(obj["records"]) or len(obj["records"]) < 1:
        fail("summary.num_routes", f"is {s['num_routes']!r} but the file holds {len(obj['records'])} route records "
                                   "(one per route, at least one)")
    for i, r in enumerate(obj["records"]):
        w = f"records[{i}]"
        if not isinstance(r, dict):
            fail(w, "must be an object")
        for key in RECORD_KEYS:
            if key not in r:
                fail(w, f"is missing {key!r}")
        for key in ("route_id", "status", "scenario_type", "scenario_name", "weather_id", "save_name", "town_name"):
            if not isinstance(r[key], str):
                fail(f"{w}.{key}", f"must be a string, got {r[key]!r}")
        try:
            route_number_of(r["route_id"])
        except CraftError:
            fail(f"{w}.route_id", f"{r['route_id']!r} is not of the form RouteScenario_<int>_rep<k>")
        for key in ("index", "town_seed", "num_infractions"):
            if not isinstance(r[key], int) or isinstance(r[key], bool):
                fail(f"{w}.{key}", f"must be an integer, got {r[key]!r}")
        if not isinstance(r["scores"], dict):
            fail(f"{w}.scores", "must be an object")
        for key in ("score_route", "score_penalty", "score_composed"):
            if key not in r["scores"]:
                fail(f"{w}.scores", f"is missing {key!r}")
            if not _num(r["scores"][key]) or not math.isfinite(r["scores"][key]):
                fail(f"{w}.scores.{key}", f"must be a finite number, got {r['scores'][key]!r}")
        if not isinstance(r["infractions"], dict):
            fail(f"{w}.infractions", "must be an object")
        for key in INFRACTION_KEYS:
            if key not in r["infractions"]:
                fail(f"{w}.infractions", f"is missing {key!r}")
            v = r["infractions"][key]
            if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
                fail(f"{w}.infractions.{key}", "must be a list of strings")
        if not isinstance(r["meta"], dict):
            fail(f"{w}.meta", "must be an object")
        for key in ("route_length", "duration_game"):
            if key not in r["meta"]:
                fail(f"{w}.meta", f"is missing {key!r}")
            if not _num(r["meta"][key]):
                fail(f"{w}.meta.{key}", f"must be a number, got {r['meta'][key]!r}")
    cp = obj["_checkpoint"]
    if not isinstance(cp, dict):
        fail("_checkpoint", "must be an object")
    for key in ("global_record", "progress", "records"):
        if key not in cp:
            fail("_checkpoint", f"is missing {key!r}")
    if not isinstance(cp["records"], list) or len(cp["records"]) != len(obj["records"]):
        fail("_checkpoint.records", "must hold the same records as 'records'")
    g = cp["global_record"]
    if not isinstance(g, dict):
        fail("_checkpoint.global_record", "must be an object")
    for key in ("status", "infractions", "scores_mean", "scores_std_dev", "meta"):
        if key not in g:
            fail("_checkpoint.global_record", f"is missing {key!r}")
