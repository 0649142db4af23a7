"""Where the scenario sits on the route: our split vs Bench2Drive's 220 routes.

    PYTHONPATH=. python benchmarks/route_distribution.py --b2d ../shared/reference/bench2drive220.xml \
        --split test --json docs/results/parity/route_distribution_after.json

Bench2Drive (its routes XML): route length along the waypoints; trigger = route metres of the waypoint
nearest the scenario's trigger point (where its scenario is activated); interaction = trigger + the
scenario's ``distance`` parameter (the 13 types where it places the obstacle / crossing / cut-in / oncoming
invaders that far ahead; YieldToEmergencyVehicle's is behind the ego and is left out); route left after each. Ours (``meta["span"]``, :meth:`craft.scenarios.base.Ctx.span`):
activation = where the scenario counts as started (``min(8 m, interaction)``; our scripts are armed from the
route start), first reaction = the first route point where one of its scripted triggers can fire,
interaction = the event point. Percentiles 10 / 50 / 90 and min / max.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np


def _q(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    return {"n": int(len(x)), "p10": round(float(np.percentile(x, 10)), 1), "p50": round(float(np.median(x)), 1),
            "p90": round(float(np.percentile(x, 90)), 1), "min": round(float(x.min()), 1),
            "max": round(float(x.max()), 1)}


def b2d_stats(path: str) -> tuple[dict, set[str]]:
    root = ET.parse(path).getroot()
    length, trig, after_trig, inter, after_inter, types = [], [], [], [], [], set()
    for rt in root.findall("route"):
        p = np.array([[float(w.get("x")), float(w.get("y"))] for w in rt.find("waypoints")])
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        sc = rt.find("scenarios")[0]
        tp = sc.find("trigger_point")
        t = cum[int(np.argmin(np.linalg.norm(p - [float(tp.get("x")), float(tp.get("y"))], axis=1)))]
        length.append(cum[-1])
        trig.append(t)
        after_trig.append(cum[-1] - t)
        d = sc.find("distance")
        if d is not None and sc.get("type") != "YieldToEmergencyVehicle":  # its distance is behind the ego
            types.add(sc.get("type"))
            inter.append(t + float(d.get("value")))
            after_inter.append(cum[-1] - t - float(d.get("value")))
    return ({"route_length": _q(length), "trigger": _q(trig), "after_trigger": _q(after_trig),
             "interaction (distance types)": _q(inter), "after_interaction (distance types)": _q(after_inter)},
            types)


def our_stats(split: str, distance_types: set[str]) -> dict:
    from craft.scenarios.base import ACTIVATION_M
    from craft.scenarios.splits import split_specs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        insts = split_specs(split)
    L = np.array([i.route_length for i in insts])
    sp = [i.meta["span"] for i in insts]
    inter = np.array([s["interaction_m"] for s in sp])
    act = np.minimum(ACTIVATION_M, inter)
    first = np.array([s["trigger_m"] for s in sp])
    dist = np.array([i.type in distance_types for i in insts])
    return {"route_length": _q(L), "trigger": _q(act), "after_trigger": _q(L - act),
            "first_reaction": _q(first), "interaction": _q(inter), "after_interaction": _q(L - inter),
            "interaction (distance types)": _q(inter[dist]), "after_interaction (distance types)": _q((L - inter)[dist])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--b2d", default="../shared/reference/bench2drive220.xml")
    ap.add_argument("--split", default="test")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    b2d, types = b2d_stats(args.b2d)
    out = {"bench2drive220": b2d, "ours": our_stats(args.split, types), "distance_types": sorted(types),
           "split": args.split}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.json)
    for k in out["ours"]:
        o, b = out["ours"][k], out["bench2drive220"].get(k)
        fmt = lambda d: f"{d['p10']:.0f} / {d['p50']:.0f} / {d['p90']:.0f} ({d['min']:.0f}-{d['max']:.0f})"  # noqa: E731
        print(f"{k:38s} ours {fmt(o):28s} b2d {fmt(b) if b else '-'}")


if __name__ == "__main__":
    main()
