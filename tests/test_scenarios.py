"""Scenario framework: building, routes, batched scripts firing in a scripted drive, splits."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from craft.errors import CraftError  # noqa: E402
from craft.world.autopilot import PlanExecutor, route_plan  # noqa: E402
from craft.world.kinds import AgentKind  # noqa: E402
from craft.world.map import JunctionKind, LightState  # noqa: E402
from craft.world.state import Mode  # noqa: E402
from craft.world.towns import generate_town  # noqa: E402
from craft.world.world import World  # noqa: E402
from craft.scenarios import build_scenario, implemented_types, start  # noqa: E402
from craft.scenarios.base import ABILITIES, ROUTE_MAX, ROUTE_MIN, SCENARIOS  # noqa: E402
from craft.scenarios import script as sc  # noqa: E402
from craft.scenarios.splits import B2D_TYPES, SPLITS, split_specs, split_town_seeds  # noqa: E402

TOWN_SEEDS = (0, 1, 2, 3, 4, 5)
TYPES = implemented_types()
STEPS = 420


@pytest.fixture(scope="module")
def towns6():
    return [generate_town(s) for s in TOWN_SEEDS]


# ---------------------------------------------------------------------- building
def test_registry_covers_every_ability_twice():
    assert set(TYPES) <= set(B2D_TYPES)
    per = {a: [t for t in TYPES if SCENARIOS[t][0] == a] for a in ABILITIES}
    for a, ts in per.items():
        assert len(ts) >= 2, (a, ts)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_every_type_builds_with_routes_in_range(seed):
    town = generate_town(seed)
    lens = []
    for t in TYPES:
        inst = build_scenario(t, town, np.random.default_rng(seed))
        assert inst.type == t and inst.town_seed == seed
        assert ROUTE_MIN <= inst.route_length <= ROUTE_MAX, (t, inst.route_length)
        route = inst.spec.route
        for a, b in zip(route[:-1], route[1:]):  # connected through the lane graph
            assert b in town.successors(a) or b in (int(town.lane_left[a]), int(town.lane_right[a])), t
        n = len(inst.spec.agents)
        for r in inst.rules:
            if r.action.kind == sc.A_LIGHT:
                assert 0 <= r.agent < len(town.light_lane)
            else:
                assert 0 <= r.agent <= n, (t, r)
        if inst.first_junction_progress_m is not None:
            assert 0 <= inst.first_junction_progress_m <= inst.route_length
        lens.append(inst.route_length)
    assert 60 <= float(np.median(lens)) <= 160


def test_same_seed_same_scenario(town):
    for t in TYPES:
        a = build_scenario(t, town, np.random.default_rng(7))
        b = build_scenario(t, town, np.random.default_rng(7))
        assert a.spec == b.spec and repr(a.rules) == repr(b.rules) and a.route_length == b.route_length


def test_unknown_type_and_unfit_town_raise(town):
    with pytest.raises(CraftError, match="unknown or not yet implemented"):
        build_scenario("NoSuchScenario", town, np.random.default_rng(0))
    bare = generate_town(0)
    bare.extras = dict(bare.extras)
    feats = dict(bare.extras["features"])
    feats["junctions"] = [j for j in feats["junctions"] if j["kind"] != int(JunctionKind.SIGNAL)]
    bare.extras["features"] = feats
    with pytest.raises(CraftError, match="cannot host"):
        build_scenario("VanillaSignalizedTurnEncounterRedLight", bare, np.random.default_rng(0), attempts=5)


def test_junction_types_route_through_the_right_junction(town):
    feats = town.extras["features"]["junctions"]
    for t, kinds in [("VanillaSignalizedTurnEncounterRedLight", {2}), ("VanillaNonSignalizedTurn", {0}),
                     ("VanillaNonSignalizedTurnEncounterStopsign", {1}), ("OppositeVehicleRunningRedLight", {2}),
                     ("NonSignalizedJunctionLeftTurn", {0, 1}), ("T_Junction", {0, 1, 2})]:
        for k in range(3):
            inst = build_scenario(t, town, np.random.default_rng(k))
            j = feats[inst.meta["junction"]]
            assert j["kind"] in kinds, t
            assert inst.meta["connector"] in inst.spec.route
            assert inst.first_junction_progress_m is not None
            if t == "T_Junction":
                assert j["arms"] == 3
            if t.endswith("Stopsign"):
                assert town.lane_stop[inst.meta["incoming"]] >= 0
            if t == "VanillaNonSignalizedTurn":
                assert town.lane_stop[inst.meta["incoming"]] < 0


# ---------------------------------------------------------------------- script unit tests
def test_pack_pads_and_rejects_bad_chains():
    r = sc.Rule(1, sc.Trigger.time(1.0), sc.Action.release())
    tb = sc.pack([[r], [r, sc.Rule(1, sc.Trigger.after(0), sc.Action.speed(3.0))], []])
    assert tb.trig_type.shape == (3, 2) and tb.trig_type[0, 1] == sc.T_NONE and tb.trig_type[2, 0] == sc.T_NONE
    with pytest.raises(CraftError):
        sc.pack([[sc.Rule(1, sc.Trigger.after(5), sc.Action.release())]])
    with pytest.raises(CraftError):
        sc.Action.flag("no_such_flag")


def test_apply_triggers_and_actions_on_a_hand_made_state():
    from craft.world.state import empty_state

    st = empty_state(2, 3, 2, 1, 1, 2)
    st = st.replace(valid=torch.ones(2, 3, dtype=torch.bool), hold=torch.ones(2, 3, dtype=torch.bool),
                    mode=torch.full((2, 3), Mode.LANE))
    st.pos[:, 1] = torch.tensor([10.0, 0.0])
    st.pos[:, 2] = torch.tensor([50.0, 0.0])
    st.speed[:, 0] = 10.0  # ego at the origin heading +x at 10 m/s
    rules = [[sc.Rule(1, sc.Trigger.near_agent(1, 12.0), sc.Action.release()),
              sc.Rule(2, sc.Trigger.ttc(2, 5.0, 100.0), sc.Action.free(1.0, 2.0)),
              sc.Rule(0, sc.Trigger.after(0, 0.3), sc.Action.perturb(-1.0, 0.1, 0.5)),
              sc.Rule(1, sc.Trigger.time(0.0), sc.Action.light(int(LightState.RED))),
              sc.Rule(2, sc.Trigger.progress(5.0), sc.Action.flag("siren"))],
             [sc.Rule(1, sc.Trigger.near_point(40.0, 0.0, 5.0), sc.Action.release())]]
    tb = sc.pack(rules)
    st2, tb = sc.apply(st, tb, t=0.0)
    assert tb.fired[0].tolist() == [True, True, False, True, False]  # ttc = (50-4.5)/10 < 5
    assert not tb.fired[1, 0]
    assert not bool(st2.hold[0, 1]) and bool(st2.hold[1, 1])
    assert st2.mode[0, 2] == Mode.FREE and abs(float(st2.yaw[0, 2]) - 1.0) < 1e-6
    assert float(st2.speed_override[0, 2]) == 2.0 and not bool(st2.hold[0, 2])
    assert st2.light_override[0, 1] == int(LightState.RED) and st2.light_override[1, 1] == -1
    st3, tb = sc.apply(st2, tb, t=0.2)
    assert not tb.fired[0, 2]
    st3, tb = sc.apply(st3.replace(progress=torch.tensor([6.0, 0.0])), tb, t=0.3)
    assert tb.fired[0, 2] and tb.fired[0, 4] and bool(st3.siren[0, 2]) and not bool(st3.siren[1, 2])
    assert torch.allclose(tb.ego_perturbation[0], torch.tensor([-1.0, 0.1])) and (tb.ego_perturbation[1] == 0).all()
    _, tb = sc.apply(st3, tb, t=0.9)
    assert (tb.ego_perturbation == 0).all()  # the window is over


# ---------------------------------------------------------------------- scripted drive
@pytest.fixture(scope="module")
def drive(towns6):
    """Every implemented type twice (on different towns and draws), one world each, driven by the naive
    route follower (route_plan + PlanExecutor, 6 m/s, blind to other road users) through World.step with
    the script applied every step; per-step histories of the agents are recorded."""
    n = len(towns6)
    off = int(os.environ.get("CRAFT_SCENARIO_TEST_SEED", "0"))  # robustness sweeps: other draws
    mi = lambda i, r: (i + r * 3 + off) % n  # noqa: E731
    insts = [build_scenario(t, towns6[mi(i, r)], np.random.default_rng(100 + i + 1000 * r + 7919 * off),
                            map_index=mi(i, r)) for r in range(2) for i, t in enumerate(TYPES)]
    world = World(towns6)
    state, table = start(world, insts, seed=3)
    ex = PlanExecutor(state.batch_size)
    hist = {k: [] for k in ("pos", "yaw", "speed", "lane", "offset", "valid", "siren", "mode", "lights",
                            "fired", "pert", "speed_override")}
    init = state
    for k in range(STEPS):
        state, table = sc.apply(state, table, maps=world.maps)
        if k % 5 == 0:
            ex.set_plan(state, route_plan(state, 6.0))
        ctrl = ex.control(state) + table.ego_perturbation
        hist["lights"].append(world.lights(state))
        hist["fired"].append(table.fired.clone())
        hist["pert"].append(table.ego_perturbation.clone())
        state, _ = world.step(state, ctrl)
        for f in ("pos", "yaw", "speed", "lane", "offset", "valid", "siren", "mode", "speed_override"):
            hist[f].append(getattr(state, f).clone())
    h = {k: torch.stack(v) for k, v in hist.items()}  # (T, B, ...)
    return dict(insts=insts, init=init, state=state, table=table, h=h, world=world, towns=towns6)


def _rows(drive, t):
    """The two worlds of type ``t``: [(world index, instance)]."""
    b = TYPES.index(t)
    return [(b, drive["insts"][b]), (b + len(TYPES), drive["insts"][b + len(TYPES)])]


def _fire_step(drive, b, rule):
    f = drive["h"]["fired"][:, b, rule]
    assert bool(f.any()), f"rule {rule} never fired"
    return int(f.float().argmax())


def test_drive_every_rule_fires_and_routes_are_cut(drive):
    st, tb = drive["state"], drive["table"]
    for b, inst in enumerate(drive["insts"]):
        n = len(inst.rules)
        # rules that wait for a long delay (a light back to its cycle, a flow's later vehicles and what follows
        # them) may legitimately not have fired yet
        earliest: list[float] = []  # the earliest time each rule can fire, s (chained rules follow theirs)
        for r in inst.rules:
            t = r.trigger
            earliest.append(t.params[0] if t.kind == sc.T_TIME else
                            earliest[t.agent] + t.params[0] if t.kind == sc.T_AFTER else 0.0)
        late = {i for i, e in enumerate(earliest) if e > STEPS * 0.1 - 5.0 or (
            inst.rules[i].trigger.kind == sc.T_AFTER and inst.rules[i].trigger.params[0] > 30)}
        fired = [bool(tb.fired[b, i]) or i in late for i in range(n)]
        assert all(fired), (inst.type, [(i, inst.rules[i].name) for i in range(n) if not fired[i]])
        assert abs(float(drive["init"].route_length[b]) - inst.route_length) < 3.0, inst.type
        assert float(st.progress[b]) > 0.6 * inst.route_length, (inst.type, float(st.progress[b]))


def _moved_after(drive, b, agent, step, min_dist):
    p = drive["h"]["pos"][:, b, agent]
    return float((p[-1] - p[step]).norm()) >= min_dist


HELD = ["AccidentTwoWays", "ParkedObstacleTwoWays", "ConstructionObstacleTwoWays", "HazardAtSideLane",
        "HazardAtSideLaneTwoWays", "ParkedObstacle", "Accident", "ConstructionObstacle", "ParkingExit",
        "OppositeVehicleTakingPriority", "NonSignalizedJunctionLeftTurn", "NonSignalizedJunctionRightTurn",
        "SignalizedJunctionLeftTurn", "SignalizedJunctionRightTurn", "EnterActorFlow", "CrossingBicycleFlow",
        "InterurbanActorFlow", "SignalizedJunctionLeftTurnEnterFlow", "NonSignalizedJunctionLeftTurnEnterFlow",
        "OppositeVehicleRunningRedLight", "VehicleOpensDoorTwoWays", "InterurbanAdvancedActorFlow",
        "MergerIntoSlowTrafficV2", "MergerIntoSlowTraffic", "HighwayExit"]


@pytest.mark.parametrize("t", [t for t in HELD if t in TYPES])
def test_drive_released_agents_start_moving(drive, t):
    for b, inst in _rows(drive, t):
        rel = [i for i, r in enumerate(inst.rules) if r.action.kind == sc.A_RELEASE]
        assert rel
        moved = 0
        for i in rel:
            k = _fire_step(drive, b, i)
            a = inst.rules[i].agent
            if k >= 2:
                assert float(drive["h"]["speed"][:k - 1, b, a].abs().max()) < 0.05  # frozen before
            moved += _moved_after(drive, b, a, k, 3.0)
        assert moved >= 1, t


@pytest.mark.parametrize("t", ["DynamicObjectCrossing", "ParkingCrossingPedestrian", "PedestrianCrossing",
                               "VehicleTurningRoute", "VehicleTurningRoutePedestrian"])
def test_drive_walker_steps_out(drive, t):
    for b, inst in _rows(drive, t):
        w = inst.meta["walker"]
        i = next(i for i, r in enumerate(inst.rules) if r.agent == w)
        k = _fire_step(drive, b, i)
        h = drive["h"]
        assert float(h["speed"][:k, b, w].abs().max()) < 0.05  # waited hidden
        assert int(h["mode"][k, b, w]) == Mode.FREE
        yaw = float(h["yaw"][k + 5, b, w])
        assert abs(math.remainder(yaw - inst.meta["walker_yaw"], 2 * math.pi)) < 0.05
        p0, p1 = h["pos"][k, b, w], h["pos"][min(k + 20, STEPS - 1), b, w]
        step = p1 - p0
        head = torch.tensor([math.cos(yaw), math.sin(yaw)])
        assert float(step @ head) > 1.0  # walked along its heading


@pytest.mark.parametrize("t", ["StaticCutIn", "ParkingCutIn", "HighwayCutIn"])
def test_drive_cut_in_reaches_the_ego_lane(drive, t):
    for b, inst in _rows(drive, t):
        car, target = inst.meta["cutter"], inst.meta["target_lane"]
        k = _fire_step(drive, b, 0 if t != "StaticCutIn" else len(inst.rules) - 1)
        h = drive["h"]
        assert int(h["lane"][k, b, car]) == target
        off0 = abs(float(h["offset"][k, b, car]))
        assert off0 > 1.0  # starts beside the lane
        later = min(k + 40, STEPS - 1)
        assert abs(float(h["offset"][later, b, car])) < 0.5
        assert _moved_after(drive, b, car, k, 3.0)
        dyaw = torch.remainder(h["yaw"][k: k + 40, b, car] - h["yaw"][k - 1, b, car] + math.pi, 2 * math.pi) - math.pi
        assert float(dyaw.abs().max()) > 0.03  # steered across
        town = drive["towns"][inst.spec.map_index]
        lane_pts = torch.from_numpy(town.lane_points(target))
        d0 = float((lane_pts - h["pos"][k, b, car]).norm(dim=-1).min())
        later = h["pos"][k + 40: k + 100, b, car]  # within 4-10 s
        d1 = float((lane_pts[None] - later[:, None]).norm(dim=-1).min(1).values.min())
        # physically moved from beside the lane towards / onto it (it may pause mid-way for the ego: react_ego)
        assert d0 > 1.5 and d1 < d0 - 1.5, (d0, d1)


def test_drive_hard_break(drive):
    for b, inst in _rows(drive, "HardBreakRoute"):
        lead = inst.meta["lead"]
        k = _fire_step(drive, b, 0)
        sp = drive["h"]["speed"][:, b, lead]
        assert float(sp[k - 1]) > 4.0
        assert float(sp[k + 15]) < 0.5  # stopped within 1.5 s: hard braking


def test_drive_control_loss(drive):
    for b, inst in _rows(drive, "ControlLoss"):
        k = _fire_step(drive, b, 0)
        pert = drive["h"]["pert"][:, b]
        assert (pert[:k] == 0).all()
        assert bool((pert[k] != 0).any())
        assert bool((pert[-1] == 0).all())  # windows end


def test_drive_emergency_vehicle_from_behind(drive):
    for b, inst in _rows(drive, "YieldToEmergencyVehicle"):
        ev = inst.emergency_index
        assert ev is not None and inst.spec.agents[ev - 1].kind == AgentKind.EMERGENCY
        k = _fire_step(drive, b, 0)
        h = drive["h"]
        rel = h["pos"][k, b, ev] - h["pos"][k, b, 0]
        ego_head = torch.tensor([math.cos(float(h["yaw"][k, b, 0])), math.sin(float(h["yaw"][k, b, 0]))])
        assert float(rel @ ego_head) < -15.0  # behind the ego
        assert bool(h["siren"][k, b, ev])
        assert float(h["speed"][k + 60, b, ev]) > 8.0  # fast
        gap0 = float(rel.norm())
        gap1 = float((h["pos"][k + 100, b, ev] - h["pos"][k + 100, b, 0]).norm())
        assert gap1 < gap0  # closing in


def test_drive_invading_turn(drive):
    for b, inst in _rows(drive, "InvadingTurn"):
        h = drive["h"]
        for a in inst.meta["invaders"][:1]:
            i = next(i for i, r in enumerate(inst.rules) if r.agent == a and r.action.kind == sc.A_OFFSET)
            k = _fire_step(drive, b, i)
            w = float(drive["towns"][inst.spec.map_index].lane_width[inst.meta["opposite"]])
            # Bench2Drive's offset: the 'offset' parameter (0.18-0.34 m) + half the lane width - 0.7 m
            lo, hi = 0.18 + 0.5 * w - 0.7, 0.34 + 0.5 * w - 0.7
            held = h["offset"][k + 1: k + 40, b, a]
            # towards the ego lane and held there (the world's lane-change model pulls back 0.02 m per step)
            assert lo - 0.03 <= float(held.min()) and float(held.max()) <= hi + 1e-3
            assert k == 0 or float(h["offset"][:k, b, a].abs().max()) < 1e-3


def test_drive_forced_lights(drive):
    # Bench2Drive's VanillaSignalizedTurnEncounterRedLight: red for 5 s, then green until the ego is through
    for b, inst in _rows(drive, "VanillaSignalizedTurnEncounterRedLight"):
        li = inst.meta["light"]
        k = _fire_step(drive, b, 0)
        L = drive["h"]["lights"][:, b, li]
        k2 = _fire_step(drive, b, 1)
        assert k2 - k == 50 and (L[k + 1: k2] == int(LightState.RED)).all()
        k3 = _fire_step(drive, b, 2) if bool(drive["h"]["fired"][-1, b, 2]) else STEPS  # back to its cycle
        assert k3 - k2 >= 300 and (L[k2: k3] == int(LightState.GREEN)).all()


def test_drive_forced_green(drive):
    # ...EncounterGreenLight: green for 5 s, then red for 5 s (a slow ego meets it), then its own cycle
    for b, inst in _rows(drive, "VanillaSignalizedTurnEncounterGreenLight"):
        L = drive["h"]["lights"][:, b, inst.meta["light"]]
        k, k2, k3 = (_fire_step(drive, b, i) for i in range(3))
        assert k2 - k == 50 and k3 - k2 == 50
        assert (L[k + 1: k2] == int(LightState.GREEN)).all() and (L[k2: k3] == int(LightState.RED)).all()


def test_drive_red_light_runner(drive):
    for b, inst in _rows(drive, "OppositeVehicleRunningRedLight"):
        town = drive["towns"][inst.spec.map_index]
        ego_l, oth_l = int(town.lane_light[inst.meta["incoming"]]), int(town.lane_light[inst.meta["other_incoming"]])
        i = next(i for i, r in enumerate(inst.rules) if r.action.kind == sc.A_LIGHT and r.agent == oth_l)
        k = _fire_step(drive, b, i)
        assert int(drive["h"]["lights"][k + 1, b, oth_l]) == int(LightState.RED)
        assert int(drive["h"]["lights"][k + 1, b, ego_l]) == int(LightState.GREEN)
        car = inst.meta["crossing"][0]
        assert bool(inst.spec.agents[car - 1].behaviour["ignore_lights"])


def test_drive_door_opens(drive):
    for b, inst in _rows(drive, "VehicleOpensDoorTwoWays"):
        door = inst.meta["door"]
        k = _fire_step(drive, b, 1)
        v = drive["h"]["valid"][:, b, door]
        assert not bool(v[:k].any()) and bool(v[k:].all())


def test_drive_blocked_intersection(drive):
    for b, inst in _rows(drive, "BlockedIntersection"):
        car = inst.meta["blocker"]
        k = _fire_step(drive, b, 1)
        assert float(drive["h"]["speed"][:k, b, car].max()) < 0.1
        assert _moved_after(drive, b, car, k, 2.0)


def test_drive_obstacles_block_the_route(drive):
    types = ["ParkedObstacle", "Accident", "ConstructionObstacle", "ParkedObstacleTwoWays", "AccidentTwoWays",
             "ConstructionObstacleTwoWays", "VehicleOpensDoorTwoWays", "SequentialLaneChange"]
    for b, inst in [row for t in types for row in _rows(drive, t)]:
        t = inst.type
        ob = inst.meta["obstacle"]
        p = drive["init"].pos[b, ob]
        rp = drive["init"].route_pts[b][drive["init"].route_valid[b]]
        assert int(drive["init"].kind[b, ob]) in (int(AgentKind.STATIC), int(AgentKind.EMERGENCY))
        if t == "SequentialLaneChange":  # both obstacles block the lane the route has just left
            for o in (ob, inst.meta["obstacle2"]):
                d = float((rp - drive["init"].pos[b, o]).norm(dim=-1).min())
                assert 2.5 < d < 4.5, d
        else:  # on the route itself
            assert float((rp - p).norm(dim=-1).min()) < 1.6, t


# ---------------------------------------------------------------------- splits
def test_splits_disjoint_town_seeds():
    pools = {s: set(split_town_seeds(s)) for s in SPLITS}
    names = list(pools)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not pools[names[i]] & pools[names[j]]
    assert SPLITS["test"][3] * 44 == 220 and SPLITS["train"][3] >= 20


def test_split_specs_deterministic_and_in_pool():
    types = TYPES[:6]
    a = split_specs("val", types=types)
    b = split_specs("val", types=types)
    assert len(a) == 2 * len(types)
    pool = split_town_seeds("val")
    for x, y in zip(a, b):
        assert x.spec == y.spec and repr(x.rules) == repr(y.rules)
        assert x.town_seed == pool[x.spec.map_index]
    with pytest.raises(CraftError):
        split_specs("nope")  # (the long split is tested in test_long_split.py)
    missing = [t for t in B2D_TYPES if t not in TYPES]
    if missing:
        with pytest.warns(UserWarning):
            split_specs("val", types=[missing[0], TYPES[0]], routes=1)
        with pytest.raises(CraftError):
            split_specs("val", types=[missing[0]], routes=1, strict=True)
