"""Small hand-built maps for tests of traffic and the world."""

from __future__ import annotations

import numpy as np

from craft.world.map import JunctionKind, LaneType, RawJunction, RawLane, RawLight, RawStop, RoadMap


def straight_road(length: float = 1000.0, lanes: int = 2, speed: float = 20.0) -> RoadMap:
    """``lanes`` parallel same-direction lanes along +x (lane 0 rightmost at y=0), each looping into itself
    is not possible, so they just end; plus a sidewalk."""
    raw = []
    for i in range(lanes):
        y = 3.5 * i
        raw.append(RawLane(np.array([[0.0, y], [length, y]]), 3.5, speed, road=0,
                           left=i + 1 if i + 1 < lanes else -1, right=i - 1 if i > 0 else -1))
    raw.append(RawLane(np.array([[0.0, -4.0], [length, -4.0]]), 2.0, 2.0, LaneType.SIDEWALK))
    return RoadMap.build("straight", raw)


def crossroads(kind: JunctionKind = JunctionKind.SIGNAL, arm: float = 100.0) -> RoadMap:
    """A single-lane 4-way crossing of roads along x (west->east) and y (south->north), one direction each.

    Lanes: 0 west incoming, 1 south incoming, 2 connector W->E (straight), 3 connector S->N (straight),
    4 east outgoing, 5 north outgoing. Junction box radius 8 m around the origin.
    """
    r = 8.0
    raw = [
        RawLane(np.array([[-arm, 0.0], [-r, 0.0]]), 3.5, 12.0, road=0, successors=[2]),
        RawLane(np.array([[0.0, -arm], [0.0, -r]]), 3.5, 12.0, road=1, successors=[3]),
        RawLane(np.array([[-r, 0.0], [r, 0.0]]), 3.5, 12.0, junction=0, successors=[4],
                priority=2 if kind == JunctionKind.UNCONTROLLED else 1),
        RawLane(np.array([[0.0, -r], [0.0, r]]), 3.5, 12.0, junction=0, successors=[5],
                priority=0 if kind == JunctionKind.UNCONTROLLED else 1),
        RawLane(np.array([[r, 0.0], [arm, 0.0]]), 3.5, 12.0, road=2),
        RawLane(np.array([[0.0, r], [0.0, arm]]), 3.5, 12.0, road=3),
    ]
    junctions = [RawJunction((0.0, 0.0), r, kind, green=10.0, yellow=3.0, all_red=1.0, n_phases=2)]
    lights = [RawLight(0, 0, 0), RawLight(1, 0, 1)] if kind == JunctionKind.SIGNAL else []
    stops = [RawStop(0, 0), RawStop(1, 0)] if kind == JunctionKind.STOP else []
    return RoadMap.build(f"cross-{kind.name.lower()}", raw, junctions, lights, stops)
