"""The scenario types (all 44 of Bench2Drive), built from :mod:`craft.scenarios.base`.

Each builder places the ego route and the scenario's agents on a fitting town feature and writes the
script. Parameters (positions, speeds, trigger distances, counts) are drawn from ``ctx.rng``. Agent
indices in rules are world indices (first explicit agent = 1). Adversaries, flows and their triggers follow
Bench2Drive's scenario scripts (time-to-arrival triggers, flows at constant velocity that ignore vehicles:
``docs/benchmark.md``, "Scenario adversaries", compares every type; the section "Bench2Drive's adversaries
and flows" below holds the shared pieces).

Overtaking
    ParkedObstacle / Accident (static police car + crashed cars + debris) / ConstructionObstacle (sign +
    cone taper) on a lane with a free same-direction left lane, plus a held car on that lane released as the
    ego nears; ``TwoWays`` variants on two-way single-lane roads with held oncoming cars released as the ego
    nears the obstacle. HazardAtSideLane(TwoWays): 1-3 held cyclists released at 2-4 m/s (lane centre: the
    world keeps no persistent lateral offset for lane agents). VehicleOpensDoorTwoWays: parked car at the
    lane edge and a door box hidden (``valid`` False) until the ego is 18-30 m away.
Merging
    (Non)SignalizedJunctionLeft/RightTurn(EnterFlow), EnterActorFlow, CrossingBicycleFlow (bicycles),
    InterurbanActorFlow / InterurbanAdvancedActorFlow (junctions with a highway / frontage arm; advanced:
    two streams), MergerIntoSlowTrafficV2: continuous flows (``_flow``) on conflicting connectors from other
    arms (the map's ``lane_conflict``), queues pinned through the junction, at Bench2Drive's speeds and spacings,
    ignoring vehicles, the ego, lights, signs and priority. HighwayCutIn: a held car on
    the acceleration lane cuts into the ego's highway lane at 12-18 m/s when the ego is 20-35 m away.
    MergerIntoSlowTraffic: route on-ramp -> acceleration lane -> main lane with a flow on the main lane.
    HighwayExit: route inner lane -> right lane -> deceleration lane -> off-ramp with
    a flow on the right lane. SequentialLaneChange: route r -> left -> r on parallel lanes with a
    broken-down car blocking each lane the route leaves. ParkingExit: start on a parking lane between parked
    cars, traffic approaching from behind.
Emergency_Brake
    DynamicObjectCrossing / ParkingCrossingPedestrian: a pedestrian (or cyclist) hidden behind a parked car
    steps out (FREE mode, heading across the road) at 14-24 m. PedestrianCrossing: 1-3 pedestrians cross
    the exit crosswalk of a junction. VehicleTurningRoute(Pedestrian): after the ego's turn a cyclist /
    pedestrian crosses the exit road. HardBreakRoute: lead car brakes to 0 after the ego passes 20-45 m of
    route, drives on 4-8 s later. StaticCutIn / ParkingCutIn: a stopped / parked car cuts into the ego lane
    (world lane-change model via :meth:`Action.cut_in`). OppositeVehicleRunningRedLight: an emergency car crossing at
    60 km/h from the left or right, released when the ego's time to arrival at the conflict point is 2.2 s,
    its light forced red and the ego's green. OppositeVehicleTakingPriority: same on a non-signalised junction. BlockedIntersection: a car stops on the exit lane, clears 6-12 s after the ego
    reaches it. ControlLoss: three chained ego control perturbations (``table.ego_perturbation``).
Give_Way
    YieldToEmergencyVehicle: emergency vehicle (siren) 25-45 m behind the ego on its lane, released after
    0.5-2 s at 12-18 m/s, ignoring lights / priority (``ScenarioInstance.emergency_index``). InvadingTurn:
    an oncoming flow on a curved two-way road held at Bench2Drive's lateral offset towards the ego lane
    (:meth:`Action.offset`), cones on its outer edge.
Traffic_Signs
    VanillaSignalizedTurnEncounterRedLight (ego light forced red for 5 s 18-29 m before the line, then green)
    / GreenLight (green for 5 s, then red for 5 s), VanillaNonSignalizedTurn (uncontrolled, no
    stop sign), VanillaNonSignalizedTurnEncounterStopsign (a stop sign on the ego's lane), T_Junction
    (3-arm junction). Starred Bench2Drive types also count for Traffic_Signs
    (``ScenarioInstance.abilities``).
"""

from __future__ import annotations

import math

import numpy as np

from craft.world.kinds import AgentKind
from craft.world.map import JunctionKind, LaneType, LightState
from craft.world.state import QUEUE, Mode
from craft.scenarios.base import LEFT, RIGHT, STRAIGHT, Ctx, NoPlace, lane_pose, offset_pose, register, wrap
from craft.scenarios.script import A_NONE, Action, Trigger

SIG, STOP, UNC = JunctionKind.SIGNAL, JunctionKind.STOP, JunctionKind.UNCONTROLLED
NONSIG = (STOP, UNC)
HALF_PI = math.pi / 2
EVENT_AFTER_START = (44.0, 62.0)  # route metres from the ego start to a straight-road event (obstacle, cut-in)
ROUTE_AFTER_EVENT = (40.0, 75.0)  # route metres kept after it (on top of the event's own span)


# ====================================================================== shared pieces
def _straight_event(ctx: Ctx, lanes: list[int], margin: float = 15.0, span: float = 10.0):
    """Route whose event (an obstacle) sits on one of ``lanes`` at ``s``: (lane, s)."""
    lane = ctx.choice(lanes, "fitting road lane")
    L = float(ctx.m.lane_length[lane])
    if L < 2 * margin + span:
        raise NoPlace(f"lane {lane} too short")
    s = ctx.u(margin, L - margin - span)
    # Bench2Drive's placement (its 220 routes): the event ~50 m (10-90 %: 49-62 m) after the route start and
    # ~80 m (50-85 m) of route after it
    pre, s0 = ctx.back(lane, s, ctx.u(EVENT_AFTER_START[0], EVENT_AFTER_START[1]))
    ctx.set_route(pre, [lane], s0, reach=(lane, s, span + ctx.u(ROUTE_AFTER_EVENT[0], ROUTE_AFTER_EVENT[1])))
    ctx.meta.update(event_lane=lane, event_s=s, event_progress=ctx.progress_of(lane, s))
    return lane, s


def _oncoming(ctx: Ctx, lane: int, s_obs: float, n: int, trigger_d: float, anchor: int) -> list[int]:
    """Held vehicles on the opposite lane beyond the obstacle, released when the ego nears ``anchor``."""
    m = ctx.m
    opp = int(m.lane_left_opposite[lane])
    if opp < 0:
        raise NoPlace(f"lane {lane} has no opposite lane")
    L = float(m.lane_length[opp])
    s_opp = L - s_obs  # same road, reversed
    out = []
    d = ctx.u(12.0, 25.0)
    for i in range(n):
        so = s_opp - d - i * ctx.u(14.0, 22.0)
        if so < 3.0:
            break
        v = ctx.u(6.0, float(m.lane_speed_limit[opp]))
        a = ctx.add(AgentKind.CAR, lane=opp, s=so, hold=True, v_des=v, lane_changes=False)
        ctx.rule(a, Trigger.near_agent(anchor, trigger_d), Action.release(), "oncoming")
        out.append(a)
    if not out:
        raise NoPlace("no room for oncoming traffic")
    return out


def _obstacle_lanes(ctx: Ctx, two_ways: bool) -> list[int]:
    if two_ways:
        return ctx.road_lanes(min_len=55.0, two_way=True)
    return ctx.road_lanes(min_len=55.0, left_free=True)


def _parked(ctx: Ctx, lane: int, s: float, lateral: float = -0.4) -> int:
    return ctx.add_static("parked_car", lane, s, lateral)


def _accident(ctx: Ctx, lane: int, s: float) -> int:
    """Police car (siren off, static) behind two crashed cars and debris; returns the first agent."""
    police = ctx.add(AgentKind.EMERGENCY, pos=offset_pose(ctx.m, lane, s, -0.3)[0],
                     yaw=lane_pose(ctx.m, lane, s)[1], mode=Mode.STATIC, speed=0.0)
    # like Bench2Drive's Accident the wreck stays inside its lane (shifted towards the kerb, slightly skewed):
    # a car turned across the road would close the neighbour lane the ego has to use too
    ctx.add_static("parked_car", lane, s + ctx.u(8.0, 11.0), ctx.u(-0.5, -0.1), yaw_offset=ctx.u(-0.3, 0.3))
    ctx.add_static("debris", lane, s + ctx.u(13.0, 15.0), ctx.u(-0.5, 0.3))
    ctx.add_static("parked_car", lane, s + ctx.u(17.0, 20.0), ctx.u(-0.5, -0.1), yaw_offset=ctx.u(-0.3, 0.3))
    return police


def _construction(ctx: Ctx, lane: int, s: float) -> int:
    """A warning sign and a taper of cones closing the lane; returns the sign."""
    w = float(ctx.m.lane_width[lane])
    sign = ctx.add_static("traffic_warning", lane, s, 0.0)
    n = int(ctx.rng.integers(5, 9))
    for i in range(n):  # taper from the right edge across to the left edge, then along it
        frac = min(1.0, i / 3)
        ctx.add_static("cone", lane, s + 2.0 + 2.5 * i, -0.5 * w + 0.3 + (w - 0.6) * frac)
    return sign


# ====================================================================== Overtaking
def _obstacle_type(kind: str, two_ways: bool):
    def build(ctx: Ctx):
        lane, s = _straight_event(ctx, _obstacle_lanes(ctx, two_ways), span=22.0 if kind != "parked" else 8.0)
        if kind == "parked":
            first = _parked(ctx, lane, s)
            if ctx.rng.random() < 0.5:
                _parked(ctx, lane, s + ctx.u(7.0, 10.0))
        elif kind == "accident":
            first = _accident(ctx, lane, s)
        else:
            first = _construction(ctx, lane, s)
        ctx.meta["obstacle"] = first
        if two_ways:
            _oncoming(ctx, lane, s, int(ctx.rng.integers(2, 5)), ctx.u(35.0, 60.0), first)
        else:  # traffic on the free lane too, so the lane change needs a gap
            left = int(ctx.m.lane_left[lane])
            a = ctx.add(AgentKind.CAR, lane=left, s=max(0.0, s - ctx.u(25.0, 45.0)), hold=True,
                        v_des=ctx.u(7.0, 11.0))
            ctx.rule(a, Trigger.near_agent(first, ctx.u(35.0, 55.0)), Action.release(), "side traffic")
    return build


register("ParkedObstacle", "Overtaking")(_obstacle_type("parked", False))
register("ParkedObstacleTwoWays", "Overtaking")(_obstacle_type("parked", True))
register("Accident", "Overtaking")(_obstacle_type("accident", False))
register("AccidentTwoWays", "Overtaking")(_obstacle_type("accident", True))
register("ConstructionObstacle", "Overtaking")(_obstacle_type("construction", False))
register("ConstructionObstacleTwoWays", "Overtaking")(_obstacle_type("construction", True))


def _hazard(two_ways: bool):
    def build(ctx: Ctx):
        lane, s = _straight_event(ctx, _obstacle_lanes(ctx, two_ways), span=25.0)
        d = ctx.u(25.0, 45.0)
        bikes = []
        for i in range(int(ctx.rng.integers(1, 4))):
            b = ctx.add(AgentKind.BICYCLE, lane=lane, s=s + 4.0 * i, hold=True, lane_changes=False,
                        speed_override=ctx.u(2.0, 4.0), react_ego=False)
            ctx.rule(b, Trigger.near_agent(b, d), Action.release(), "cyclists start")
            bikes.append(b)
        ctx.meta["obstacle"] = bikes[0]
        if two_ways:
            _oncoming(ctx, lane, s, int(ctx.rng.integers(2, 4)), d + 10.0, bikes[0])
    return build


register("HazardAtSideLane", "Overtaking")(_hazard(False))
register("HazardAtSideLaneTwoWays", "Overtaking")(_hazard(True))


@register("VehicleOpensDoorTwoWays", "Overtaking")
def _opens_door(ctx: Ctx):
    lane, s = _straight_event(ctx, _obstacle_lanes(ctx, True), span=10.0)
    w = float(ctx.m.lane_width[lane])
    car = ctx.add_static("parked_car", lane, s, -0.5 * w + 0.8)
    # the open door: a thin static box beside the car's driver side, hidden until the ego comes close
    pos, h = offset_pose(ctx.m, lane, s + 0.8, -0.5 * w + 0.8 + 1.0 + 0.45)
    door = ctx.add(AgentKind.STATIC, pos=pos, yaw=h + 1.2, mode=Mode.STATIC, size=(1.0, 0.15))
    ctx.rule(door, Trigger.time(0.0), Action.valid(False), "door closed")
    ctx.rule(door, Trigger.near_agent(car, ctx.u(18.0, 30.0)), Action.valid(True), "door opens")
    ctx.meta.update(obstacle=car, door=door)
    _oncoming(ctx, lane, s, int(ctx.rng.integers(2, 4)), ctx.u(35.0, 55.0), car)


# ====================================================================== Emergency_Brake
WALKER_TTA = (2.1, 2.3)  # DynamicObjectCrossing's time to arrival (2.1 + 0.1 per 5 degrees of crossing angle), s
WALKER_MIN_DIST = 6.0  # its minimum trigger distance, m
WALKER_SPEED = 2.0  # its walker's speed, m/s


def _crossing_walker(ctx: Ctx, kind: AgentKind, parking_only: bool = False):
    """A pedestrian / cyclist hidden behind a parked car on the right steps in front of the ego."""
    m = ctx.m
    if parking_only:
        parks = [p for p in ctx.f["parking"] if float(m.lane_length[p]) > 40 and ctx.is_driving(int(m.lane_left[p]))]
        p = ctx.choice(parks, "parking lane")
        lane = int(m.lane_left[p])
        _straight_event(ctx, [lane], span=8.0)
    else:
        lane, _ = _straight_event(ctx, ctx.road_lanes(min_len=45.0), span=8.0)
    s = ctx.meta["event_s"]
    w = float(m.lane_width[lane])
    right = int(m.lane_right[lane])
    if right >= 0 and int(m.lane_type[right]) == int(LaneType.PARKING):
        car_lat = -0.5 * w - 0.5 * float(m.lane_width[right])
    else:
        car_lat = -0.5 * w - 1.0 if right < 0 else -0.5 * w - 0.5 * float(m.lane_width[right])
    ctx.add_static("parked_car", lane, s, car_lat)
    if parking_only:
        ctx.add_static("parked_car", lane, s + ctx.u(7.0, 9.0), car_lat)
    (px, py), h = offset_pose(m, lane, s + 3.6, car_lat - 0.3)
    walker = ctx.add(kind, pos=(px, py), yaw=h + HALF_PI, mode=Mode.FREE, hold=True, react_ego=False,
                     lane_changes=False)
    # Bench2Drive (DynamicObjectCrossing / ParkingCrossingPedestrian): the walker starts at 2 m/s when the ego's
    # time to arrival at the point of its lane beside the walker falls below 2.1-2.35 s (its crossing_angle
    # adds 0.1 s per 5 degrees), or the ego is within 6 m of that point
    cx, cy = lane_pose(m, lane, s + 3.6)[0]
    tta = ctx.u(*WALKER_TTA) + (0.05 if parking_only else 0.0)
    ctx.rule(walker, Trigger.arrival(float(cx), float(cy), tta, WALKER_MIN_DIST), Action.free(h + HALF_PI, WALKER_SPEED),
             "steps out")
    ctx.meta.update(walker=walker, walker_yaw=h + HALF_PI)


@register("DynamicObjectCrossing", "Emergency_Brake")
def _doc(ctx: Ctx):
    _crossing_walker(ctx, AgentKind.PEDESTRIAN)


@register("ParkingCrossingPedestrian", "Emergency_Brake")
def _pcp(ctx: Ctx):
    _crossing_walker(ctx, AgentKind.PEDESTRIAN, parking_only=True)


HARD_BREAK_STOP = 10.0  # HardBreakRoute: the vehicles ahead stand this long before they drive on, s


@register("HardBreakRoute", "Emergency_Brake")
def _hard_break(ctx: Ctx):
    lanes = ctx.road_lanes(min_len=90.0)
    lane = ctx.choice(lanes, "long road lane")
    L = float(ctx.m.lane_length[lane])
    s_ego = ctx.u(2.0, 10.0)
    ctx.set_route([], [lane], s_ego, reach=ctx.u(60.0, 90.0))
    lead = ctx.add(AgentKind.CAR, lane=lane, s=s_ego + ctx.u(14.0, 22.0), lane_changes=False, react_ego=False,
                   speed_override=ctx.u(6.0, 9.0), ignore_lights=True)
    brake_at = ctx.u(20.0, max(22.0, min(45.0, L - 45.0)))
    ctx.rule(lead, Trigger.progress(brake_at), Action.speed(0.0), "lead brakes")
    ctx.rule(lead, Trigger.after(0, HARD_BREAK_STOP), Action.speed(ctx.u(6.0, 9.0)), "lead drives on")
    ctx.meta.update(lead=lead, brake_progress=brake_at)


CUT_IN_STATIC = (2.7, 15.0, -1.0)  # (time to arrival s, minimum distance m, speed: -1 = the ego's speed)
CUT_IN_PARKING = (2.35, 10.0, 20.0 / 3.6)


def _cut_in(ctx: Ctx, parking: bool):
    m = ctx.m
    if parking:
        parks = [p for p in ctx.f["parking"] if float(m.lane_length[p]) > 45 and ctx.is_driving(int(m.lane_left[p]))]
        p = ctx.choice(parks, "parking lane")
        lane = int(m.lane_left[p])
        L = float(m.lane_length[p])
        s = ctx.u(20.0, L - 15.0)
        side = p
    else:
        # Bench2Drive's five StaticCutIn routes all have the stopped column on the ego's right
        lanes = [x for x in ctx.road_lanes(min_len=60.0, multi=True)
                 if m.lane_left[x] >= 0 and ctx.is_driving(int(m.lane_left[x]))]
        side = ctx.choice(lanes, "multi-lane road lane")
        lane = int(m.lane_left[side])
        L = float(m.lane_length[side])
        s = ctx.u(25.0, L - 15.0)
    pre, s0 = ctx.back(lane, s, ctx.u(EVENT_AFTER_START[0], EVENT_AFTER_START[1]))
    ctx.set_route(pre, [lane], s0, reach=(lane, min(s, float(m.lane_length[lane])),
                                          ctx.u(ROUTE_AFTER_EVENT[0], ROUTE_AFTER_EVENT[1])))
    if parking:
        # parked cars behind it and (leaving room to pull out) further ahead
        ctx.add_static("parked_car", side, s - ctx.u(6.0, 7.5), 0.0)
        ctx.add_static("parked_car", side, min(L - 3.0, s + ctx.u(13.0, 16.0)), 0.0)
    else:  # a queue of stopped cars on the side lane: behind the cutter, and one well ahead
        for k in range(int(ctx.rng.integers(1, 3))):
            ctx.add(AgentKind.CAR, lane=side, s=max(0.0, s - 7.5 * (k + 1)), hold=True)
        ctx.add(AgentKind.CAR, lane=side, s=min(L - 2.0, s + ctx.u(16.0, 22.0)), hold=True)
    car = ctx.add(AgentKind.CAR, lane=side, s=s, hold=True, lane_changes=False, react_ego=True)
    # Bench2Drive: the cutter goes when the ego's time to arrival at the point of its lane beside the cutter is
    # below 2.7 s / 15 m (StaticCutIn: at the ego's own speed) or 2.35 s / 10 m (ParkingCutIn: 20 km/h)
    tta, dmin, speed = CUT_IN_PARKING if parking else CUT_IN_STATIC
    cx, cy = lane_pose(m, lane, min(s, float(m.lane_length[lane])))[0]
    ctx.rule(car, Trigger.arrival(float(cx), float(cy), tta, dmin), Action.cut_in(lane, speed), "cut in")
    ctx.meta.update(cutter=car, target_lane=lane,
                    event_progress=ctx.progress_of(lane, min(s, float(m.lane_length[lane]))))


@register("StaticCutIn", "Emergency_Brake")
def _static_cut_in(ctx: Ctx):
    _cut_in(ctx, parking=False)


@register("ParkingCutIn", "Emergency_Brake")
def _parking_cut_in(ctx: Ctx):
    _cut_in(ctx, parking=True)


@register("ControlLoss", "Emergency_Brake")
def _control_loss(ctx: Ctx):
    lanes = ctx.road_lanes(min_len=60.0)
    lane = ctx.choice(lanes, "road lane")
    pre, s0 = ctx.back(lane, 0.0, ctx.u(10.0, 30.0))
    ctx.set_route(pre, [lane], s0, reach=ctx.u(60.0, 90.0))
    at = ctx.u(15.0, 35.0)
    prev = None
    for k in range(3):
        trig = Trigger.progress(at) if prev is None else Trigger.after(prev, ctx.u(1.0, 2.5))
        prev = ctx.rule(0, trig, Action.perturb(ctx.u(-1.5, 0.5), ctx.u(-0.12, 0.12), ctx.u(0.6, 1.5)),
                        f"slip {k}")
    ctx.meta["first_slip_progress"] = at


# ---------------------------------------------------------------------- Bench2Drive's adversaries and flows
# (its scenario_runner/srunner/scenarios/*.py and scenarioatomics/atomic_behaviors.py; docs/benchmark.md,
# "Scenario adversaries", compares every type)
SYNC_TIME = 2.2  # OppositeVehicleJunction._sync_time: the adversary starts when the ego's time to arrival at the
# collision location falls below this, s
MIN_TRIGGER_DIST = 12.0  # ... or when the ego comes this close to it (the fallback for a slow ego), m
ADVERSARY_SPEED = 60.0 / 3.6  # the crossing adversary's constant velocity, m/s
ADVERSARY_SOURCE = 30.0  # Bench2Drive starts it this far before its junction entry (see _opposite_vehicle), m
ADVERSARY_SINK = 10.0  # and is removed this far past the junction exit, m
FLOW_SOURCE_TIME = 4.0  # a junction flow's source lies flow_speed * this before the junction entry, s
FLOW_SINK_TIME = 2.5  # and its sink flow_speed * this past the exit, s
FREEZE_DIST = 60.0  # scripted lights are frozen once the ego is this close to its stop line, m
SOURCE_FIRST = 0.1  # the earliest time the source's first vehicle appears, s
FLOW_DURATION = 30.0  # s during which the source keeps spawning (Bench2Drive: until the ego leaves the junction)
# flow speed (m/s) and spawn-distance interval (m) per type: the ranges of Bench2Drive's 220 routes
# (flow_speed, source_dist_interval from / to)
FLOWS = {
    "SignalizedJunctionLeftTurn": ((9.0, 11.0), (15.0, 24.0), (25.0, 28.0)),
    "SignalizedJunctionLeftTurnEnterFlow": ((8.0, 10.0), (16.0, 24.0), (25.0, 30.0)),
    "SignalizedJunctionRightTurn": ((10.0, 14.0), (19.0, 24.0), (26.0, 38.0)),
    "NonSignalizedJunctionLeftTurn": ((8.0, 11.0), (15.0, 24.0), (25.0, 30.0)),
    "NonSignalizedJunctionLeftTurnEnterFlow": ((8.0, 10.0), (15.0, 19.0), (26.0, 30.0)),
    "NonSignalizedJunctionRightTurn": ((8.0, 14.0), (16.0, 22.0), (25.0, 30.0)),
    "EnterActorFlow": ((12.0, 19.0), (17.0, 30.0), (30.0, 39.0)),
    "CrossingBicycleFlow": ((8.0, 12.0), (5.0, 15.0), (25.0, 30.0)),
    "InterurbanActorFlow": ((15.0, 16.0), (42.0, 53.0), (78.0, 98.0)),
    "InterurbanAdvancedActorFlow": ((16.0, 18.0), (36.0, 42.0), (84.0, 94.0)),
    "MergerIntoSlowTraffic": ((9.0, 10.0), (14.0, 16.0), (33.0, 42.0)),
    "MergerIntoSlowTrafficV2": ((10.0, 10.0), (11.0, 14.0), (30.0, 34.0)),
    "HighwayExit": ((10.0, 15.0), (11.0, 20.0), (33.0, 46.0)),
}
# ActorFlow's vehicles: constant velocity, the traffic manager told to ignore every vehicle (the ego too), light
# and sign, until one of them collides (craft.world.world: they drive like traffic again after hitting the ego)
FLOW_FLAGS = dict(ignore_lights=True, ignore_stops=True, ignore_priority=True, ignore_vehicles=True,
                  react_ego=False, lane_changes=False)


def _conflict_s(m, conn: int, other: int) -> tuple[float, float]:
    """Arc lengths of the conflict point of two connectors on each of them."""
    row = [int(x) for x in m.lane_conflict[conn]]
    if other in row:
        k = row.index(other)
        return float(m.lane_conflict_s[conn, k]), float(m.lane_conflict_other_s[conn, k])
    return 0.5 * float(m.lane_length[conn]), 0.5 * float(m.lane_length[other])


def _heading_gap(m, a: int, b: int) -> float:
    """Absolute heading difference of the ends of lanes ``a`` and ``b`` (two incoming lanes of a junction), rad."""
    return abs(wrap(lane_pose(m, b, float(m.lane_length[b]))[1] - lane_pose(m, a, float(m.lane_length[a]))[1]))


def _other_arms(ctx: Ctx, inc: int, conf: list, lo: float = math.radians(30.0), hi: float = math.pi) -> list:
    """The conflicting movements of ``conf`` that enter from another arm, at a heading ``lo``..``hi`` from the
    ego's incoming lane ``inc`` (a neighbour lane of the ego's own road conflicts on multi-lane roads too)."""
    return [c for c in conf if lo <= _heading_gap(ctx.m, inc, c[0]) <= hi + 1e-6]


def _flow_lanes(ctx: Ctx, inc: int, after: list[int], back: float) -> tuple[list[int], float, float]:
    """The lanes of a flow whose source lies ``back`` m before the end of ``inc`` and that then drives the
    lanes ``after`` (connector, exit, ...). Returns (lanes from the source lane on, source arc length, the
    distance actually backed up): the source moves closer when the lanes before ``inc`` are too many for an
    agent's pinned queue."""
    L_in = float(ctx.m.lane_length[inc])
    d = back
    for _ in range(6):
        lane, s, path = ctx.lane_path_back(inc, L_in, d)
        if len(path) <= 2:  # the queue (3 lanes) then reaches the connector, whose successor is unique
            return [lane] + path + list(after), s, d
        d *= 0.7
    raise NoPlace("flow source too far from the junction")


def _along(m, lanes: list[int], s0: float, x: float) -> tuple[int, float]:
    """Index into ``lanes`` and arc length of the point ``x`` m downstream of ``(lanes[0], s0)``."""
    s = s0 + x
    for i, ln in enumerate(lanes):
        L = float(m.lane_length[ln])
        if s <= L or i == len(lanes) - 1:
            return i, min(s, L)
        s -= L
    raise AssertionError("unreachable")


def _flow(ctx: Ctx, lanes: list[int], s0: float, length: float, speed: float, interval: tuple[float, float],
          kind=AgentKind.CAR, duration: float = FLOW_DURATION, flags: dict | None = None, start: float = 0.0,
          offset: float = 0.0, name: str = "flow") -> list[int]:
    """Bench2Drive's ``ActorFlow`` from ``(lanes[0], s0)`` along ``lanes`` for ``length`` m: vehicles at
    ``speed`` spaced by uniform draws from ``interval``, the path populated at the start (``initial_actors``)
    and a new vehicle at the source whenever the last one is a fresh spacing away, for ``duration`` s; each
    vehicle is removed at the sink. The source's vehicles are a pool of hidden agents shown in turn (the world
    has a fixed agent count). ``start`` > 0 delays the pool (the populated path still moves from t = 0).
    ``offset`` != 0: every vehicle keeps that lateral offset (m, left positive) while it drives.
    Returns the agent indices."""
    m = ctx.m
    flags = FLOW_FLAGS if flags is None else flags
    out = []
    x = ctx.u(*interval)
    nearest = x
    while x < length:  # the populated path, moving from the start
        i, s = _along(m, lanes, s0, x)
        a = ctx.add(kind, lane=lanes[i], s=s, speed=speed, queue=lanes[i + 1:i + 1 + QUEUE], speed_override=speed,
                    v_des=speed, **flags)
        ctx.rule(a, Trigger.time((length - x) / speed), Action.valid(False), f"{name}: sink")
        if offset:
            ctx.rule(a, Trigger.time(0.0), Action.offset(offset, (length - x) / speed), f"{name}: offset")
        out.append(a)
        x += ctx.u(*interval)
    # (the source's first vehicle comes a step after the start at the earliest: a time-0 rule is set-up, which
    # long routes keep at their own start)
    t = max(SOURCE_FIRST, (ctx.u(*interval) - nearest) / speed if out else 0.0) + start
    while t <= start + duration:  # the source
        a = ctx.add(kind, lane=lanes[0], s=s0, hold=True, queue=lanes[1:1 + QUEUE], speed_override=speed, v_des=speed,
                    **flags)
        ctx.rule(a, Trigger.time(0.0), Action.valid(False), f"{name}: pooled")
        r = ctx.rule(a, Trigger.time(t), Action.valid(True), f"{name}: source")
        ctx.rule(a, Trigger.after(r, 0.0), Action.release(speed), f"{name}: drives")
        ctx.rule(a, Trigger.after(r, length / speed), Action.valid(False), f"{name}: sink")
        if offset:
            ctx.rule(a, Trigger.after(r, 0.0), Action.offset(offset, length / speed), f"{name}: offset")
        out.append(a)
        t += ctx.u(*interval) / speed
    return out


def _freeze_lights(ctx: Ctx, ego_incoming: int, states: list[tuple[int, int]]) -> None:
    """Force the lights of the given incoming lanes to the given states once the ego is within
    ``FREEZE_DIST`` of its stop line (Bench2Drive's ``TrafficLightFreezer`` from the scenario's start)."""
    m = ctx.m
    anchor = lane_pose(m, ego_incoming, float(m.lane_length[ego_incoming]))[0]
    trig = Trigger.near_point(float(anchor[0]), float(anchor[1]), FREEZE_DIST)
    for lane, state in states:
        li = int(m.lane_light[lane])
        if li >= 0:
            ctx.rule(li, trig, Action.light(state), "light frozen")


def _flow_params(ctx: Ctx) -> tuple[float, tuple[float, float]]:
    """This type's flow speed and spawn interval, drawn within Bench2Drive's ranges."""
    v, lo, hi = FLOWS[ctx.type]
    return ctx.u(*v), (ctx.u(*lo), ctx.u(*hi))


def _junction_flow(ctx: Ctx, kinds, ego_turn, other_turns, kind=AgentKind.CAR, where=None, streams: int = 1,
                   arms=None, lights: dict | None = None) -> list[int]:
    """Ego through a junction of one of ``kinds`` with ``ego_turn``; ``streams`` flows (``_flow``) on
    conflicting connectors of ``other_turns`` from other arms, source ``FLOW_SOURCE_TIME`` s of driving before
    their junction entry and sink ``FLOW_SINK_TIME`` s past the exit (Bench2Drive's junction scenarios).
    ``lights``: forced light states when the ego nears the junction (``"ego"`` / ``"flow"`` keys)."""
    info = ctx.through_junction(kinds, ego_turn, arms=arms, where=where)
    conf = _other_arms(ctx, info["incoming"], ctx.conflicting(info["connector"], other_turns))
    if len(conf) < streams:
        raise NoPlace("not enough conflicting movements")
    m = ctx.m
    order = ctx.rng.permutation(len(conf))
    out_ids, used = [], []
    for q in order[:streams]:
        inc, conn, out = conf[int(q)]
        v, interval = _flow_params(ctx)
        lanes, s0, back = _flow_lanes(ctx, inc, [conn, out], FLOW_SOURCE_TIME * v)
        sink = min(FLOW_SINK_TIME * v, float(m.lane_length[out]) - 1.0)
        length = back + float(m.lane_length[conn]) + sink
        out_ids += _flow(ctx, lanes, s0, length, v, interval, kind=kind)
        used.append((inc, conn))
    inc, conn = used[0]
    if lights:
        _freeze_lights(ctx, info["incoming"], [(info["incoming"], lights["ego"]), (inc, lights["flow"])])
    ctx.meta.update(other_incoming=inc, other_connector=conn, crossing=out_ids)
    return out_ids


def _opposite_vehicle(ctx: Ctx, kinds, lights: bool) -> int:
    """Bench2Drive's ``OppositeVehicleJunction``: an emergency car ``ADVERSARY_SPEED * SYNC_TIME`` m of path before
    the collision location (Bench2Drive: ``ADVERSARY_SOURCE`` m before its entry of the junction), crossing straight at ``ADVERSARY_SPEED`` ignoring vehicles and lights once the ego's time
    to arrival at the collision location falls below ``SYNC_TIME`` (or the ego is within ``MIN_TRIGGER_DIST``),
    removed ``ADVERSARY_SINK`` m past its exit. ``lights``: the ego's light green, the adversary's red."""
    info = ctx.through_junction(kinds, STRAIGHT)
    # from the left or the right (Bench2Drive's 'direction'), crossing the ego's path
    conf = _other_arms(ctx, info["incoming"], ctx.conflicting(info["connector"], (STRAIGHT,)),
                       math.radians(45.0), math.radians(135.0))
    if not conf:
        raise NoPlace("no crossing movement")
    inc, conn, out = conf[int(ctx.rng.integers(len(conf)))]
    m = ctx.m
    s_ego, s_other = _conflict_s(m, info["connector"], conn)
    cx, cy = (float(v) for v in lane_pose(m, info["connector"], s_ego)[0])
    # Bench2Drive starts it ADVERSARY_SOURCE m before its entry, and in CARLA's towns the collision location
    # lies a few metres into the junction, so it gets there about SYNC_TIME after the trigger, with the ego; our
    # junctions are wider (the conflict point up to 25 m in), so the source keeps that path length instead
    lanes, s0, back = _flow_lanes(ctx, inc, [conn, out], max(5.0, ADVERSARY_SPEED * SYNC_TIME - s_other))
    length = back + float(m.lane_length[conn]) + min(ADVERSARY_SINK, float(m.lane_length[out]) - 1.0)
    v = ADVERSARY_SPEED
    a = ctx.add(AgentKind.EMERGENCY, lane=lanes[0], s=s0, hold=True, siren=True, queue=lanes[1:1 + QUEUE],
                speed_override=v, v_des=v, **FLOW_FLAGS)
    r = ctx.rule(a, Trigger.arrival(cx, cy, SYNC_TIME, MIN_TRIGGER_DIST), Action.release(v), "adversary starts")
    ctx.rule(a, Trigger.after(r, length / v), Action.valid(False), "adversary removed")
    if lights:
        _freeze_lights(ctx, info["incoming"], [(info["incoming"], LightState.GREEN), (inc, LightState.RED)])
    ctx.meta.update(other_incoming=inc, other_connector=conn, crossing=[a], collision_point=(cx, cy))
    return a


@register("OppositeVehicleRunningRedLight", "Emergency_Brake", traffic_signs=True)
def _ovrrl(ctx: Ctx):
    _opposite_vehicle(ctx, (SIG,), lights=True)


@register("OppositeVehicleTakingPriority", "Emergency_Brake", traffic_signs=True)
def _ovtp(ctx: Ctx):
    _opposite_vehicle(ctx, NONSIG, lights=False)


TURN_CROSSER = {  # Bench2Drive's BaseVehicleTurning: (metres past the junction exit, time to arrival s, speed m/s)
    AgentKind.BICYCLE: (11.0, 1.8, 1.8),  # VehicleTurningRoute: a bicycle from the right sidewalk
    AgentKind.PEDESTRIAN: (0.5, 2.2, 1.8),  # VehicleTurningRoutePedestrian: a walker on the exit crosswalk
}
TURN_CROSSER_MIN_DIST = 6.0  # their minimum trigger distance, m
SIDEWALK_OFFSET = 1.5  # a sidewalk starter's distance beyond the road edge, m


def _after_turn_crosser(ctx: Ctx, kind: AgentKind):
    """After the ego's turn a bicycle (from the right) or a walker (from the far side for a right turn, the right
    side for a left turn) crosses the exit road when the ego's time to arrival at its crossing point is short."""
    turn = LEFT if ctx.rng.random() < 0.5 else RIGHT
    info = ctx.through_junction((SIG, STOP, UNC), turn, after=(35.0, 70.0))
    m = ctx.m
    out = info["outgoing"]
    s, tta, speed = TURN_CROSSER[kind]
    w = float(m.lane_width[out])
    opp = int(m.lane_left_opposite[out])
    if kind == AgentKind.PEDESTRIAN and turn == RIGHT:  # from the far sidewalk, across the whole road
        far = 0.5 * w + (float(m.lane_width[opp]) if opp >= 0 else 0.0) + SIDEWALK_OFFSET
        lat, side = far, -HALF_PI
    else:
        lat, side = -0.5 * w - SIDEWALK_OFFSET, HALF_PI
    (px, py), h = offset_pose(m, out, s, lat)
    a = ctx.add(kind, pos=(px, py), yaw=h + side, mode=Mode.FREE, hold=True, react_ego=False, lane_changes=False)
    cx, cy = lane_pose(m, out, s)[0]
    ctx.rule(a, Trigger.arrival(float(cx), float(cy), tta, TURN_CROSSER_MIN_DIST), Action.free(h + side, speed),
             "crosses")
    ctx.meta.update(walker=a, walker_yaw=h + side)


@register("VehicleTurningRoute", "Emergency_Brake", traffic_signs=True)
def _vtr(ctx: Ctx):
    _after_turn_crosser(ctx, AgentKind.BICYCLE)


@register("VehicleTurningRoutePedestrian", "Emergency_Brake", traffic_signs=True)
def _vtrp(ctx: Ctx):
    _after_turn_crosser(ctx, AgentKind.PEDESTRIAN)


PED_CROSSING_TTA = 3.5  # PedestrianCrossing: the walkers start when the ego's time to arrival is below this, s
PED_CROSSING_MIN_DIST = 12.0  # ... or the ego is within this distance of the crossing, m
PED_CROSSING_WALKERS = ((0.4, 1.5), (1.0, 2.5), (1.6, 0.5))  # (forward, right) offsets of its 3 walkers, m
PED_CROSSING_SPEED = (1.3, 2.0)  # m/s
PED_CROSSING_IDLE = (0.0, 1.5)  # each walker's delay after the trigger, s


@register("PedestrianCrossing", "Emergency_Brake", traffic_signs=True)
def _ped_crossing(ctx: Ctx):
    """Bench2Drive's ``PedestrianCrossing``: three walkers cross the crosswalk at the ego's junction entry from
    its right, each after a short idle, once the ego's time to arrival there is below 3.5 s (or within 12 m)."""
    info = ctx.through_junction((SIG, STOP, UNC), STRAIGHT, after=(30.0, 70.0))
    m = ctx.m
    j = ctx.f["junctions"][info["junction"]]
    inc = info["incoming"]
    arm = next((a for a in j["arm_info"] if inc in a["incoming"]), None)
    if arm is None or not arm["crosswalk"]:
        raise NoPlace("entry arm without crosswalk")
    p_in, h_in = lane_pose(m, inc, float(m.lane_length[inc]))
    best = None
    for cw in arm["crosswalk"]:  # the crosswalk direction that starts on the ego's right side
        p0, hc = lane_pose(m, cw, 0.0)
        side = -math.sin(h_in) * (p0[0] - p_in[0]) + math.cos(h_in) * (p0[1] - p_in[1])
        if side < 0:
            best = (cw, p0, hc)
    if best is None:
        raise NoPlace("no crosswalk start on the right")
    cw, p0, hc = best
    mid = lane_pose(m, cw, 0.5 * float(m.lane_length[cw]))[0]
    gate = ctx.rule(0, Trigger.arrival(float(mid[0]), float(mid[1]), PED_CROSSING_TTA, PED_CROSSING_MIN_DIST),
                    Action(A_NONE), "walkers start")
    fwd = np.array([math.cos(h_in), math.sin(h_in)])
    right = np.array([math.sin(h_in), -math.cos(h_in)])
    walkers = []
    for f, r in PED_CROSSING_WALKERS:  # the offsets are taken from the crosswalk's start, across the road
        q = p0 + (f - 1.0) * fwd + (r - 1.5) * right
        a = ctx.add(AgentKind.PEDESTRIAN, pos=(float(q[0]), float(q[1])), yaw=hc, mode=Mode.FREE, hold=True,
                    react_ego=False, lane_changes=False)
        ctx.rule(a, Trigger.after(gate, ctx.u(*PED_CROSSING_IDLE)), Action.free(hc, ctx.u(*PED_CROSSING_SPEED)),
                 "crossing")
        walkers.append(a)
    ctx.meta.update(walker=walkers[0], walker_yaw=hc, crosswalk=cw)


@register("BlockedIntersection", "Emergency_Brake", traffic_signs=True)
def _blocked(ctx: Ctx):
    turn = [LEFT, RIGHT, STRAIGHT][int(ctx.rng.integers(3))]
    info = ctx.through_junction((SIG, STOP, UNC), turn, after=(30.0, 70.0))
    out = info["outgoing"]
    b = ctx.add(AgentKind.CAR, lane=out, s=ctx.u(3.0, 7.0), hold=True, lane_changes=False)
    r = ctx.rule(b, Trigger.near_agent(b, ctx.u(10.0, 16.0)), Action.speed(0.0), "blocking")
    ctx.rule(b, Trigger.after(r, ctx.u(6.0, 12.0)), Action.release(), "clears")
    ctx.rule(b, Trigger.after(r, 0.0), Action.speed(float("nan")), "clears speed")
    ctx.meta["blocker"] = b


# ====================================================================== Merging
_BOTH_GREEN = {"ego": LightState.GREEN, "flow": LightState.GREEN}


@register("SignalizedJunctionLeftTurn", "Merging", traffic_signs=True)
def _sjlt(ctx: Ctx):
    _junction_flow(ctx, (SIG,), LEFT, (STRAIGHT,), lights=_BOTH_GREEN)


@register("SignalizedJunctionRightTurn", "Merging", traffic_signs=True)
def _sjrt(ctx: Ctx):
    _junction_flow(ctx, (SIG,), RIGHT, (STRAIGHT, LEFT), lights=_BOTH_GREEN)


@register("NonSignalizedJunctionLeftTurn", "Merging", traffic_signs=True)
def _nsjlt(ctx: Ctx):
    _junction_flow(ctx, NONSIG, LEFT, (STRAIGHT,))


@register("NonSignalizedJunctionRightTurn", "Merging", traffic_signs=True)
def _nsjrt(ctx: Ctx):
    _junction_flow(ctx, NONSIG, RIGHT, (STRAIGHT, LEFT))


@register("SignalizedJunctionLeftTurnEnterFlow", "Merging", traffic_signs=True)
def _sjltef(ctx: Ctx):
    _junction_flow(ctx, (SIG,), LEFT, (STRAIGHT, RIGHT, LEFT), lights=_BOTH_GREEN)


@register("NonSignalizedJunctionLeftTurnEnterFlow", "Merging", traffic_signs=True)
def _nsjltef(ctx: Ctx):
    _junction_flow(ctx, NONSIG, LEFT, (STRAIGHT, RIGHT, LEFT))


@register("EnterActorFlow", "Merging", traffic_signs=True)
def _eaf(ctx: Ctx):
    _junction_flow(ctx, (SIG, STOP, UNC), [LEFT, RIGHT][int(ctx.rng.integers(2))], (STRAIGHT, LEFT, RIGHT))


@register("CrossingBicycleFlow", "Merging", traffic_signs=True)
def _cbf(ctx: Ctx):
    _junction_flow(ctx, (SIG, STOP, UNC), [LEFT, RIGHT][int(ctx.rng.integers(2))], (STRAIGHT, LEFT, RIGHT),
                   kind=AgentKind.BICYCLE)


def _interurban(j: dict) -> bool:
    """Junctions on the highway / frontage side of the town (an arm that is not an urban street)."""
    return j["terminal"] or any(a["road_kind"] not in ("street",) for a in j["arm_info"])


@register("InterurbanActorFlow", "Merging")
def _iaf(ctx: Ctx):
    _junction_flow(ctx, (SIG, STOP, UNC), LEFT, (STRAIGHT,), where=_interurban)


@register("InterurbanAdvancedActorFlow", "Merging")
def _iaaf(ctx: Ctx):
    # flows from two directions to cross / merge into
    _junction_flow(ctx, (SIG, STOP, UNC), LEFT, (STRAIGHT, LEFT, RIGHT), where=_interurban, streams=2)


@register("MergerIntoSlowTrafficV2", "Merging")
def _merger_v2(ctx: Ctx):
    # turn into a road whose traffic (merging into the same exit lane) is slow and dense
    _junction_flow(ctx, (SIG, STOP, UNC), RIGHT, (STRAIGHT, LEFT))


def _lane_flow(ctx: Ctx, lane: int, s_merge: float) -> list[int]:
    """A flow (``_flow``) along ``lane`` past ``s_merge``, where the ego's route joins or crosses it: source
    ``FLOW_SOURCE_TIME`` s of driving upstream, sink ``FLOW_SINK_TIME`` s downstream (within the lane)."""
    v, interval = _flow_params(ctx)
    rest = float(ctx.m.lane_length[lane]) - s_merge  # from the merge point to the end of the lane
    lanes, s0, back = _flow_lanes(ctx, lane, [], FLOW_SOURCE_TIME * v + rest)
    if back - rest < 10.0:
        raise NoPlace("no room for the flow's source")
    sink = max(5.0, min(FLOW_SINK_TIME * v, rest - 1.0))
    return _flow(ctx, lanes, s0, back - rest + sink, v, interval)


@register("MergerIntoSlowTraffic", "Merging")
def _merger(ctx: Ctx):
    m = ctx.m
    acc = ctx.choice(ctx.f["acceleration_lanes"], "acceleration lane")
    main = int(m.lane_left[acc])
    ramps = [p for p in m.predecessors(acc) if ctx.is_driving(p)]
    if not ctx.is_driving(main) or not ramps:
        raise NoPlace("acceleration lane without ramp / main lane")
    ramp = ramps[0]
    s0 = ctx.u(10.0, 45.0)
    ctx.set_route([], [ramp, acc, main], s0, reach=(main, float(m.lane_length[acc]) * 0.5, ctx.u(25.0, 50.0)))
    e = 0.5 * float(m.lane_length[acc])  # the dense route leaves the acceleration lane half way
    flow = _lane_flow(ctx, main, e)
    ctx.meta.update(flow=flow, merge_lane=main)
    ctx.n_vehicles = max(ctx.n_vehicles, 15)


@register("HighwayExit", "Merging")
def _highway_exit(ctx: Ctx):
    m = ctx.m
    dec = ctx.choice(ctx.f["deceleration_lanes"], "deceleration lane")
    rights = [p for p in m.predecessors(dec) if ctx.is_driving(p)]
    if not rights:
        raise NoPlace("deceleration lane without a feeding lane")
    r = rights[0]
    inner = int(m.lane_left[r])
    offs = [x for x in m.successors(dec) if ctx.is_driving(x)]
    if not ctx.is_driving(inner) or not offs:
        raise NoPlace("no inner lane / off-ramp")
    L = float(m.lane_length[r])
    s0 = max(0.0, L - ctx.u(50.0, 90.0))
    ctx.set_route([], [inner, r, dec, offs[0]], s0, reach=(offs[0], ctx.u(10.0, 40.0), 0.0))
    e = s0 + 0.5 * (L - s0)  # where the route changes lane
    flow = _lane_flow(ctx, r, e)
    ctx.meta.update(flow=flow, exit_lane=dec)


@register("SequentialLaneChange", "Merging")
def _sequential(ctx: Ctx):
    m = ctx.m
    cands = []
    for x in range(m.num_lanes):
        if not ctx.is_driving(x) or m.lane_junction[x] >= 0 or x in ctx.extra_lanes:
            continue
        left = int(m.lane_left[x])
        # parallel lanes only (equal lengths): the dense route carries the arc length across a lane change
        if ctx.is_driving(left) and left not in ctx.extra_lanes and float(m.lane_length[x]) >= 130.0 \
                and abs(float(m.lane_length[x]) - float(m.lane_length[left])) < 1.5:
            cands.append(x)
    r = ctx.choice(cands, "long two-lane section")
    left = int(m.lane_left[r])
    L = float(m.lane_length[r])
    s0 = ctx.u(0.0, max(0.0, L - 130.0))
    # route r -> left -> r; the world's dense route leaves each lane half way along its rest
    e1 = s0 + 0.5 * (L - s0)
    e2 = e1 + 0.5 * (L - e1)
    ctx.set_route([], [r, left, r], s0, reach=(r, min(L, e2 + ctx.u(15.0, 30.0)), 0.0))
    a = _broken_down(ctx, r, ctx.u(e1 + 4.0, max(e1 + 5.0, e2 - 12.0)))
    b = _broken_down(ctx, left, min(L - 2.0, e2 + ctx.u(8.0, 15.0)))
    ctx.meta.update(obstacle=a, obstacle2=b)


def _broken_down(ctx: Ctx, lane: int, s: float) -> int:
    car = ctx.add_static("parked_car", lane, s, 0.0)
    ctx.add_static("traffic_warning", lane, max(0.0, s - ctx.u(6.0, 10.0)), 0.0)
    return car


@register("HighwayCutIn", "Merging")
def _highway_cut_in(ctx: Ctx):
    m = ctx.m
    acc = ctx.choice(ctx.f["acceleration_lanes"], "acceleration lane")
    main = int(m.lane_left[acc])
    if not ctx.is_driving(main):
        raise NoPlace("acceleration lane without a main lane")
    ramp = ctx.choice(m.predecessors(acc), "on-ramp")
    s_car = ctx.u(10.0, 40.0)
    pre, s0 = ctx.back(main, s_car, ctx.u(45.0, 80.0))
    ctx.set_route(pre, [main], s0, reach=(main, s_car, ctx.u(40.0, 70.0)))
    v = ctx.u(12.0, 18.0)
    car = ctx.add(AgentKind.CAR, lane=acc, s=s_car, hold=True, lane_changes=False, speed=0.0)
    ctx.rule(car, Trigger.near_agent(car, ctx.u(20.0, 35.0)), Action.cut_in(main, v, initial_speed=v), "cut in")
    ctx.meta.update(cutter=car, target_lane=main, ramp=ramp)
    ctx.n_vehicles = max(ctx.n_vehicles, 20)


@register("ParkingExit", "Merging")
def _parking_exit(ctx: Ctx):
    m = ctx.m
    parks = [p for p in ctx.f["parking"] if float(m.lane_length[p]) > 40 and ctx.is_driving(int(m.lane_left[p]))]
    p = ctx.choice(parks, "parking lane")
    drive = int(m.lane_left[p])
    L = float(m.lane_length[p])
    s = ctx.u(8.0, L - 25.0)
    e = s + 0.5 * (L - s)  # where the dense route leaves the parking lane
    ctx.set_route([], [p, drive], s, reach=(drive, e, ctx.u(30.0, 60.0)))
    ctx.add_static("parked_car", p, min(L - 2.5, e + ctx.u(4.0, 6.0)), 0.0)
    if s > 7.0:
        ctx.add_static("parked_car", p, s - ctx.u(6.0, 7.0), 0.0)
    # traffic approaching from behind on the driving lane
    t0 = ctx.u(0.5, 3.0)
    for k in range(int(ctx.rng.integers(1, 4))):
        lane, s1, path = ctx.lane_path_back(drive, s, ctx.u(20.0, 30.0) + 18.0 * k)
        a = ctx.add(AgentKind.CAR, lane=lane, s=s1, hold=True, queue=path[:3], lane_changes=False,
                    speed_override=ctx.u(6.0, 10.0))
        ctx.rule(a, Trigger.time(t0), Action.release(), "traffic")
    ctx.meta.update(parking_lane=p, drive_lane=drive)


# ====================================================================== Give_Way
@register("YieldToEmergencyVehicle", "Give_Way")
def _yield_ev(ctx: Ctx):
    m = ctx.m
    lanes = ctx.road_lanes(min_len=70.0)
    lane = ctx.choice(lanes, "long road lane")
    L = float(m.lane_length[lane])
    back = ctx.u(25.0, 45.0)
    s_ego = ctx.u(back + 2.0, min(L - 10.0, back + 20.0)) if L - 10.0 > back + 2.0 else None
    if s_ego is None:
        raise NoPlace("lane too short")
    ctx.set_route([], [lane], s_ego, reach=ctx.u(70.0, 120.0))
    speed = ctx.u(12.0, 18.0)
    ev = ctx.add(AgentKind.EMERGENCY, lane=lane, s=s_ego - back, siren=True, hold=True, lane_changes=False,
                 speed_override=speed, v_des=speed, ignore_lights=True, ignore_priority=True, ignore_stops=True,
                 react_ego=True, headway=0.8, min_gap=2.0, a_max=3.5)
    ctx.queues[ev] = ctx.route[1:4]
    ctx.rule(ev, Trigger.time(ctx.u(0.5, 2.0)), Action.release(), "emergency vehicle starts")
    ctx.emergency = ev
    ctx.meta.update(emergency=ev)


INVADING_SPACING = 40.0  # InvadingTurn._flow_frequency: one oncoming car every this many metres, m
INVADING_OFFSET = (0.18, 0.34)  # the 'offset' parameter of Bench2Drive's 220 routes ("meters invaded"), m
INVADING_DISTANCE = (50.0, 60.0)  # the 'distance' parameter of Bench2Drive's 220 routes, m
INVADING_CONSTANT = 0.7  # InvadingTurn._offset_constant: the car keeps offset + lane width / 2 - this, m


@register("InvadingTurn", "Give_Way")
def _invading(ctx: Ctx):
    """Bench2Drive's ``InvadingTurn``: on a bend of a two-way road, oncoming cars (one every
    ``INVADING_SPACING`` m, at the ego lane's speed limit) keep ``offset + w / 2 - 0.7`` m towards the ego's
    lane, pushed there by cones on their outer edge; the ego must move right."""
    m = ctx.m
    curves = [c for c in ctx.f["curves"] if ctx.is_driving(c) and m.lane_junction[c] < 0 and c not in ctx.extra_lanes
              and float(m.lane_length[c]) > 50.0 and _opposite(ctx, c) >= 0]
    lane = ctx.choice(curves, "curved two-way road")
    L = float(m.lane_length[lane])
    pre, s0 = ctx.back(lane, 0.0, ctx.u(15.0, 40.0))
    ctx.set_route(pre, [lane], s0, reach=(lane, 0.8 * L, 0.0))
    opp = _opposite(ctx, lane)
    Lo = float(m.lane_length[opp])
    w = float(m.lane_width[opp])
    true_offset = ctx.u(*INVADING_OFFSET) + 0.5 * w - INVADING_CONSTANT
    # cones on the oncoming lane's outer edge every 5 m from 10 m past its start for half of Bench2Drive's
    # 'distance' parameter (50-60 m on its 220 routes)
    cones = []
    for k in range(int(0.5 * ctx.u(*INVADING_DISTANCE) / 5.0)):
        cones.append(ctx.add_static("cone", opp, min(Lo - 1.0, 10.0 + 5.0 * k), -0.8 * 0.5 * w))
    v = float(m.lane_speed_limit[lane])
    lanes, s_src, back = _flow_lanes(ctx, opp, [], Lo + 20.0)
    cars = _flow(ctx, lanes, s_src, back, v, (INVADING_SPACING, INVADING_SPACING),
                 flags=dict(react_ego=False, lane_changes=False), offset=true_offset, name="invading flow")
    ctx.meta.update(invaders=cars, opposite=opp, cones=cones, invasion=true_offset)


def _opposite(ctx: Ctx, lane: int) -> int:
    """The innermost opposite-direction lane next to ``lane`` (same road), or -1."""
    m = ctx.m
    cur = lane
    while m.lane_left[cur] >= 0:
        cur = int(m.lane_left[cur])
    return int(m.lane_left_opposite[cur]) if m.lane_left_opposite[cur] >= 0 and cur == lane else -1


# ====================================================================== Traffic_Signs
VANILLA_TRIGGER = (18.0, 29.0)  # distance of the trigger point from the stop line, m (Bench2Drive's routes)
VANILLA_FREEZE = 5.0  # how long its light is frozen in each state, s
VANILLA_RELEASE = 35.0  # after the red the ego keeps its green this long (Bench2Drive: until it left the junction), s


def _vanilla(kinds, turns, need_stop=None, arms=None, light=None):
    def build(ctx: Ctx):
        turn = turns[int(ctx.rng.integers(len(turns)))]
        info = ctx.through_junction(kinds, turn, arms=arms, need_stop=need_stop)
        if light is not None:
            li = int(ctx.m.lane_light[info["incoming"]])
            if li < 0:
                raise NoPlace("ego lane has no light")
            p = lane_pose(ctx.m, info["incoming"], float(ctx.m.lane_length[info["incoming"]]))[0]
            # Bench2Drive's VanillaSignalizedTurn*: at the trigger point (18-29 m before the turn on its routes)
            # the ego's light is frozen for 5 s: red then green (EncounterRedLight), or green then red for
            # another 5 s (EncounterGreenLight: a slow ego meets the red), then it goes back to its cycle
            r = ctx.rule(li, Trigger.near_point(float(p[0]), float(p[1]), ctx.u(*VANILLA_TRIGGER)), Action.light(light),
                         "force light")
            other = LightState.GREEN if light == LightState.RED else LightState.RED
            r2 = ctx.rule(li, Trigger.after(r, VANILLA_FREEZE), Action.light(other), "switch")
            ctx.rule(li, Trigger.after(r2, VANILLA_FREEZE if light == LightState.GREEN else VANILLA_RELEASE),
                     Action.light(-1), "back to cycle")
            ctx.meta.update(light=li, stop_point=(float(p[0]), float(p[1])))
    return build


register("VanillaSignalizedTurnEncounterRedLight", "Traffic_Signs")(
    _vanilla((SIG,), (LEFT, RIGHT), light=LightState.RED))
register("VanillaSignalizedTurnEncounterGreenLight", "Traffic_Signs")(
    _vanilla((SIG,), (LEFT, RIGHT), light=LightState.GREEN))
register("VanillaNonSignalizedTurn", "Traffic_Signs")(_vanilla((UNC,), (LEFT, RIGHT), need_stop=False))
register("VanillaNonSignalizedTurnEncounterStopsign", "Traffic_Signs")(_vanilla((STOP,), (LEFT, RIGHT), need_stop=True))
register("T_Junction", "Traffic_Signs")(_vanilla((SIG, STOP, UNC), (LEFT, RIGHT), arms=(3,)))

