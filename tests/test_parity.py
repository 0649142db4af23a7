"""Bench2Drive parity: a route's record does not depend on its batch; the official results layout."""

from __future__ import annotations

import json

import pytest

from craft.bench.runner import EvalConfig, LaneFollow, evaluate
from craft.scenarios.splits import route_identity, route_number, route_seed


def _records(out) -> dict[str, dict]:
    recs = json.loads((out / "results.json").read_text())["records"]
    return {r["route_id"]: {k: v for k, v in r.items() if k != "index"} for r in recs}


def test_route_seed_is_a_pure_function_of_identity_and_seed():
    a = route_seed(route_identity("test", "Accident", 3, 10007), 0)
    assert a == route_seed("test/Accident/3/10007", 0)  # the identity string is the whole key
    assert 0 <= a < 2**31 - 1
    others = {route_seed(route_identity("test", "Accident", 3, 10007), 1),
              route_seed(route_identity("test", "Accident", 4, 10007), 0),
              route_seed(route_identity("val", "Accident", 3, 10007), 0),
              route_seed(route_identity("test", "Accident", 3, 10008), 0)}
    assert a not in others and len(others) == 4
    assert route_number("Accident", 0) == 0 and route_number("AccidentTwoWays", 4) == 1004
    assert route_number("Long", 7) == 44007


def test_route_record_does_not_depend_on_its_batch(tmp_path):
    """The same route under other --types / --routes / --batch-size (and with the row dropping of a batch of
    16) gives the same record, byte for byte (only ``index``, the position in the file, differs)."""
    runs = {"big": (["Accident", "HardBreakRoute", "ControlLoss", "PedestrianCrossing"], 4, 16),
            "alone": (["ControlLoss"], 2, 1),
            "mixed": (["HardBreakRoute", "ControlLoss"], 3, 5)}
    recs = {}
    for name, (types, routes, bs) in runs.items():
        evaluate(LaneFollow(), "test", tmp_path / name, EvalConfig(batch_size=bs, max_steps=200), routes=routes,
                 types=types)
        recs[name] = _records(tmp_path / name)
    assert len(recs["big"]) == 16
    compared = 0
    for name in ("alone", "mixed"):
        for rid, rec in recs[name].items():
            assert json.dumps(rec, sort_keys=True) == json.dumps(recs["big"][rid], sort_keys=True), (name, rid)
            compared += 1
    assert compared == 8
    # the background traffic really differs between routes (the seed is per route, not one for all)
    assert len({r["meta"]["efficiency"] for r in recs["big"].values()}) > 4
