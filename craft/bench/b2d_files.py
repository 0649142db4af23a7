"""Bench2Drive's side files of an evaluation: the routes XML and the per-step files its comfort tool reads.

- :func:`routes_xml`: the evaluated routes in the layout of Bench2Drive's ``bench2drive220.xml`` — per route
  ``<route id town>`` with ``<waypoints>`` (``<position x y z>`` every ~2 m along the route, in CRAFT's world
  coordinates, z = 0), ``<scenarios>`` with one ``<scenario name type>`` and its ``<trigger_point x y z yaw>``
  (the route point at ``meta["span"]["trigger_m"]``; yaw in degrees) and an empty ``<weathers>``. The route
  ``id`` is the number of the record's ``route_id`` (``RouteScenario_<id>_rep0``), which is how
  Bench2Drive's ability_benchmark.py matches records to routes.
- :func:`metric_info`: one route's per-step file (``<save_name>/metric_info.json``), keyed by step
  (``"0"``, ``"1"``, ...), each with ``acceleration`` (world frame, m/s^2), ``angular_velocity`` (deg/s,
  CARLA's unit), ``forward_vector``, ``right_vector``, ``location`` (m) and ``rotation`` ([roll, pitch,
  yaw], deg), all 3-vectors, as Bench2Drive's agents record them for efficiency_smoothness_benchmark.py.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import numpy as np

from craft.bench.metrics import RouteLog, _series

WAYPOINT_SPACING_M = 2.0  # Bench2Drive's route files list a point every ~2 m


def _r(x: float, nd: int = 3) -> str:
    return f"{float(x):.{nd}f}"


def route_points(world, inst) -> np.ndarray:
    """(P, 2) route polyline of ``inst`` as the world drives it (cut at ``route_end_m``), one point every
    ~``WAYPOINT_SPACING_M`` m, first and last points kept."""
    from craft.world.world import _route_polyline

    m = world.maps.maps[inst.spec.map_index]
    pts = _route_polyline(m, list(inst.spec.route), inst.spec.ego_s).astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    end = float(inst.route_end_m) if inst.route_end_m is not None else float(cum[-1])
    end = min(end, float(cum[-1]))
    s = np.append(np.arange(0.0, end, WAYPOINT_SPACING_M), end)
    return np.stack([np.interp(s, cum, pts[:, 0]), np.interp(s, cum, pts[:, 1])], axis=1)


def routes_xml(world, instances: list, records: list[dict]) -> str:
    """The Bench2Drive routes file of the evaluated routes (``records[i]`` is ``instances[i]``'s record)."""
    from craft.bench.metrics import route_number_of

    root = ET.Element("routes")
    for inst, rec in zip(instances, records):
        r = ET.SubElement(root, "route", id=str(route_number_of(rec["route_id"])), town=rec["town_name"])
        pts = route_points(world, inst)
        wps = ET.SubElement(r, "waypoints")
        for x, y in pts:
            ET.SubElement(wps, "position", x=_r(x, 1), y=_r(y, 1), z="0.0")
        trig = float(inst.meta.get("span", {}).get("trigger_m", 0.0))
        cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
        tx, ty = np.interp(trig, cum, pts[:, 0]), np.interp(trig, cum, pts[:, 1])
        j = min(int(np.searchsorted(cum, trig, side="right")), len(pts) - 1)
        d = pts[j] - pts[max(j - 1, 0)] if j > 0 else pts[min(1, len(pts) - 1)] - pts[0]
        yaw = math.degrees(math.atan2(d[1], d[0])) if np.any(d) else 0.0
        scs = ET.SubElement(r, "scenarios")
        sc = ET.SubElement(scs, "scenario", name=rec["scenario_name"], type=rec["scenario_type"])
        ET.SubElement(sc, "trigger_point", x=_r(tx, 1), y=_r(ty, 1), yaw=_r(yaw, 1), z="0.0")
        ET.SubElement(r, "weathers")
    ET.indent(root, space="   ")
    return ET.tostring(root, encoding="unicode") + "\n"


def metric_info(log: RouteLog) -> dict:
    """One route's per-step file (see the module docstring) from its log (``kinematics`` and ``pose``)."""
    k = log.kinematics
    lon, lat, yaw_rate = (_series(k, n) for n in ("accel_lon", "accel_lat", "yaw_rate"))
    x, y, yaw = (_series(log.pose, n) for n in ("x", "y", "yaw"))
    if lon is None or yaw is None or x is None:
        return {}
    n = min(len(lon), len(yaw), len(x), len(yaw_rate))
    lat = lat[:n] if lat is not None else np.zeros(n)
    c, s = np.cos(yaw[:n]), np.sin(yaw[:n])
    ax, ay = lon[:n] * c - lat * s, lon[:n] * s + lat * c  # lateral: positive to the left (yaw rate x speed)
    out = {}
    rd = lambda v: round(float(v), 5)  # noqa: E731
    for i in range(n):
        out[str(i)] = {
            "acceleration": [rd(ax[i]), rd(ay[i]), 0.0],
            "angular_velocity": [0.0, 0.0, rd(math.degrees(float(yaw_rate[i])))],
            "forward_vector": [rd(c[i]), rd(s[i]), 0.0],
            "right_vector": [rd(s[i]), rd(-c[i]), 0.0],
            "location": [rd(x[i]), rd(y[i]), 0.0],
            "rotation": [0.0, 0.0, rd(math.degrees(float(yaw[i])))],
        }
    return out
