"""The ``long`` split: 500-1500 m routes chaining several scenarios (Longest6-like)."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from craft.bench.metrics import validate_results
from craft.cli import main
from craft.errors import CraftError
from craft.scenarios.base import start
from craft.scenarios.long import LONG_TYPE, NOT_CHAINED, build_long_route, shift_rules
from craft.scenarios.script import A_VALID, Action, Rule, Trigger, apply
from craft.scenarios.splits import B2D_TYPES, SPLITS, split_specs, split_town_seeds
from craft.world.autopilot import PlanExecutor, route_plan
from craft.world.map import take
from craft.world.towns import generate_town
from craft.world.world import World

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def long4():
    return split_specs("long", routes=4)


def test_long_routes_are_long_chained_and_deterministic(long4):
    again = split_specs("long", routes=4)
    pool = split_town_seeds("long")
    assert pool == list(range(40000, 40020))
    for a, b in zip(long4, again):
        assert a.spec == b.spec and repr(a.rules) == repr(b.rules) and a.meta == b.meta
    for inst in long4:
        assert inst.type == LONG_TYPE and inst.abilities == ()
        assert 500.0 <= inst.route_length <= 1500.0
        types = inst.meta["types"]
        assert len(types) >= 3 and len(set(types)) == len(types) and set(types) <= set(B2D_TYPES)
        assert not set(types) & set(NOT_CHAINED)
        starts = [c["start_m"] for c in inst.meta["chain"]]
        assert starts[0] == 0.0 and starts == sorted(starts)
        assert inst.meta["chain"][-1]["end_m"] <= inst.route_length + 0.005  # end_m is rounded to 0.01 m
        assert len(set(inst.spec.route)) == len(inst.spec.route)  # no lane visited twice
        assert inst.time_limit_s is not None and inst.time_limit_s > inst.route_length / 5.0
        assert inst.town_seed == pool[inst.spec.map_index]
    # the default is 36 routes (like Longest6); town seeds are disjoint from the other splits'
    assert SPLITS["long"][3] == 36
    for other in ("test", "val", "train"):
        assert not set(pool) & set(split_town_seeds(other))


def test_world_route_matches_the_chained_length(long4):
    used = sorted({i.spec.map_index for i in long4})
    world = World([generate_town(split_town_seeds("long")[m]) for m in used])
    insts = [copy.deepcopy(i) for i in long4]
    for i in insts:
        i.spec.map_index = used.index(i.spec.map_index)
    state, table = start(world, insts, seed=0)
    assert torch.allclose(state.route_length, torch.tensor([i.route_length for i in long4]), atol=2.0)
    # capacities come from the batch: every route point and rule fits
    assert state.route_pts.shape[1] >= max(i.route_length for i in long4) * 0.9
    assert table.num_rules == max(len(i.rules) for i in long4)
    assert state.num_agents >= 1 + max(len(i.spec.agents) for i in long4)


def test_shift_rules_moves_agents_rules_and_progress():
    rules = [Rule(1, Trigger.near_agent(2, 10.0), Action.release(), "a"),
             Rule(3, Trigger.after(0, 1.0), Action.speed(0.0), "b"),
             Rule(0, Trigger.progress(20.0), Action.perturb(0.1, 0.1, 1.0), "c"),
             Rule(5, Trigger.time(2.0), Action.light(0), "d"),
             Rule(2, Trigger.time(0.0), Action.valid(False), "e")]
    out = shift_rules(rules, agent_off=4, rule_off=7, start_m=300.0, gate=6)
    assert out[0].agent == 5 and out[0].trigger.agent == 6
    assert out[1].agent == 7 and out[1].trigger.agent == 7
    assert out[2].agent == 0 and out[2].trigger.params[0] == pytest.approx(320.0)
    assert out[3].agent == 5 and out[3].trigger.agent == 6 and out[3].trigger.params[0] == 2.0  # light index kept
    assert out[4].trigger.kind == rules[4].trigger.kind  # set-up rules stay at t = 0


def test_chained_triggers_fire_when_the_ego_arrives(long4):
    # the route whose second scenario starts earliest; drive it with the route follower past that start
    inst = copy.deepcopy(min(long4, key=lambda i: i.meta["chain"][1]["start_m"]))
    second = inst.meta["chain"][1]
    town = generate_town(inst.town_seed)
    inst.spec.map_index = 0
    world = World([town])
    state, table = start(world, [inst], seed=0)
    ex = PlanExecutor(1, state.device, dt=world.cfg.dt)
    a0, a1 = second["agents"]
    r0, r1 = second["rules"]
    hidden_before = None
    for t in range(1500):
        state, table = apply(state, table, maps=world.maps, dt=world.cfg.dt)
        if t == 1:
            hidden_before = state.valid[0, a0:a1].clone()
        if t % 5 == 0:
            limit = take(world.maps.lane_speed_limit, state.map_id, state.lane[:, 0].clamp_min(0))
            ex.set_plan(state, route_plan(state, limit))
        state, _ = world.step(state, ex.control(state) + table.ego_perturbation)
        if float(state.progress[0]) > second["start_m"] + 40.0 and bool(table.fired[0, r0:r1].any()):
            break
    assert a1 > a0 and not bool(hidden_before.any())  # its agents were hidden at the start
    assert float(state.progress[0]) > second["start_m"]
    fired = table.fired[0].tolist()
    names = [r.name for r in inst.rules]
    appears = [i for i, n in enumerate(names) if n == f"{second['type']}: appears"]
    assert appears and all(fired[i] for i in appears)
    assert any(fired[r0:r1])  # a rule of the chained scenario itself fired
    assert any(bool(state.valid[0, a]) for a in range(a0, a1)
               if not any(r.agent == a and r.action.kind == A_VALID for r in inst.rules[r0:r1]))


def test_too_few_chainable_types_is_a_clear_error():
    town = generate_town(40000)
    with pytest.raises(CraftError, match="fits only"):
        build_long_route(town, np.random.default_rng(0), ["HighwayCutIn", "Accident"])
    with pytest.raises(CraftError, match="chains at least"):
        split_specs("long", types=["YieldToEmergencyVehicle", "Accident", "ParkedObstacle"], routes=1)


def test_cli_eval_long_writes_valid_results(tmp_path, capsys):
    out = tmp_path / "long"
    rc = main(["eval", "--policy", "lane-follow", "--split", "long", "--routes", "2", "--max-steps", "150",
               "--out", str(out)])
    assert rc == 0
    obj = json.loads((out / "results.json").read_text())
    validate_results(obj)
    s = obj["summary"]
    assert s["split"] == "long" and s["num_routes"] == 2 and s["town_seeds"][0] == 40000
    assert all(v is None for v in s["abilities"].values())  # long routes belong to no ability
    for r in obj["records"]:
        assert r["scenario_type"] == LONG_TYPE and r["meta"]["end_reason"] in ("tick_cap", "completed", "collision")
        assert 500.0 <= r["meta"]["route_length"] <= 1500.0
        assert r["meta"]["scenarios"][-1]["type"] == "between scenarios"
    # bad input: one line, nothing written
    capsys.readouterr()
    bad = tmp_path / "bad"
    try:
        rc = main(["eval", "--policy", "lane-follow", "--split", "long", "--routes", "1", "--town-seeds", "40000",
                   "--types", "Accident", "ParkedObstacle", "--out", str(bad)])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "long" in err[0]
    assert not (bad / "results.json").exists()
