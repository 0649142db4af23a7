"""OpenDRIVE import: a real town (any CARLA ``.xodr``) as a :class:`~craft.world.map.RoadMap`.

:func:`load_opendrive` reads an OpenDRIVE file through the official CARLA client (``carla.Map(name, text)``
builds the road network offline, without a simulator) and fills the same map structure the procedural
generator fills, so traffic, events, observation, scenarios and the proxy never learn where a map came from.

What comes from where
---------------------
- **Frame.** CARLA's frame is left-handed (its y axis is OpenDRIVE's, flipped). The world is right-handed
  (x east, y north, headings counter-clockwise), so every CARLA position ``(x, y)`` becomes ``(x, -y)`` and
  every CARLA yaw ``psi`` (degrees) becomes ``-psi`` (radians): :func:`carla_to_world`. This is the only
  place the flip happens; route files (in CARLA's frame) go through the same function.
- **Driving lanes** are the lanes of CARLA's topology (one lane per road / lane section / lane id), sampled
  every ``ImportConfig.step`` m along the direction of travel; each lane ends at the first point of its first
  successor. Width: the median of the waypoints' widths. Successors: the topology's edges.
- **Lane changes**: a same-direction neighbour becomes ``left`` / ``right`` only if the marking between
  them permits the change somewhere along the lane (CARLA's ``lane_change``, checked at about a dozen points
  of the lane); an opposite-direction lane across the centre line is ``left_opposite``.
- **Junctions**: CARLA's junctions (centre and radius from their bounding box); a lane inside one is a
  connector (``junction`` id). A connector's manoeuvre is its heading change: within 30 degrees straight,
  more than 150 degrees a U-turn, else left (counter-clockwise) or right. Connector speed: the lower of the
  lanes it joins, capped by its curvature (``turn_lateral_accel``), at least 3 m/s.
- **Traffic lights.** The file places lights (signal type ``1000001``) on roads with the lanes they
  control, but it has no light groups (each ``<controller>`` of the shipped towns holds one signal). Phases
  are derived per junction by **approach road**: the incoming lanes of the junction are grouped by the road
  they come from (its *arm*); every arm with at least one light gets lights on all of its incoming lanes;
  each lit arm is one phase, the arms ordered counter-clockwise by the direction they approach from. So the
  arms of a junction turn green one after another (CARLA's default junction controller also cycles a
  junction's lights one after another). Timing: ``green`` / ``yellow`` / ``all_red`` seconds per phase; each
  junction's cycle starts at an offset drawn from its id. A light placed on a connector controls the
  connector's incoming lane.
- **Stop signs** (signal type ``206``): a stop line at the end of the lane they stand on (a sign on a
  connector: its incoming lane), the whole arm as for lights. A junction is SIGNAL if it has lights, else
  STOP if it has stop signs, else UNCONTROLLED.
- **Right of way** of connectors (used where there is no light): straight 2, right 1, left / U-turn 0 on an
  UNCONTROLLED junction's through arms (arms with a straight movement), one less on the other arms; all-way
  STOP junctions 1 for every movement; SIGNAL junctions: left turns 1, others 2 (as the generator does).
- **Speed limits**: the road's ``<type><speed>`` record (mph or km/h converted); roads without one get
  ``default_speed``. Connectors see above.
- **Sidewalks** are the lanes of type ``sidewalk`` (read from the file's lane sections, sampled by CARLA),
  **crosswalks** come from ``Map.get_crosswalks()`` (polygons; a crosswalk lane runs along the polygon's long
  axis, through its centre). Sidewalks are cut where a crosswalk ends next to them and walk lanes whose
  ends meet (``walk_join`` m, crosswalk ends ``crosswalk_join`` m) are joined; every walk piece is a pair
  of opposite lanes, like the generator's.

Features for scenario placement (``extras["features"]``) follow :mod:`craft.world.towns`: junction records
with their arms, connectors by manoeuvre and crosswalks; lane lists (multi-lane, two-way single-lane,
highway: lanes with a limit of at least ``highway_speed``, curves, sidewalks, crosswalks). A real town has
no tagged parking lanes, ramps or acceleration lanes, so the scenario types that need those cannot be
placed on it (the placement says so).

The imported map is cached by the file's SHA-256 (and the import settings) under
``$XDG_CACHE_HOME/craft/maps`` as an ``.npz`` + JSON (written to a temporary name and renamed; read without
pickle). A file that cannot be read or is no OpenDRIVE map raises one :class:`CraftError` line.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from craft.errors import CraftError
from craft.files import atomic_write
from craft.world.map import JunctionKind, LaneType, RawJunction, RawLane, RawLight, RawStop, RoadMap

__all__ = ["ImportConfig", "load_opendrive", "carla_to_world", "carla_yaw_to_world", "import_opendrive",
           "map_cache_dir", "IMPORT_VERSION"]

IMPORT_VERSION = 2  # bump when the import's output changes (cache keys include it)
STRAIGHT, LEFT, RIGHT, UTURN = 0, 1, 2, 3
_MPH = 0.44704
_KMH = 1 / 3.6


@dataclass(frozen=True)
class ImportConfig:
    """How an OpenDRIVE file becomes a road map."""

    step: float = 1.0
    """Sampling step along lanes, m."""
    default_speed: float = 25 * _MPH
    """Speed limit of roads whose record has none (25 mph, the lowest limit the shipped towns post), m/s."""
    turn_lateral_accel: float = 3.0
    """Connector speed cap: v <= sqrt(a * radius), m/s^2."""
    green: float = 10.0
    """Green time per phase (one phase per lit approach road), s."""
    yellow: float = 3.0
    """Yellow time, s."""
    all_red: float = 2.0
    """All-red time between phases, s."""
    stop_trigger: float = 6.0
    """Length of a stop sign's trigger area at the end of its lane, m."""
    walk_join: float = 1.5
    """Walk-lane ends closer than this are joined, m."""
    crosswalk_join: float = 4.0
    """A crosswalk end joins sidewalks within this distance (the sidewalk is cut there), m."""
    highway_speed: float = 20.0
    """Lanes with at least this limit count as highway in the scenario features, m/s."""

    def __post_init__(self):
        for name in ("step", "default_speed", "turn_lateral_accel", "green", "yellow", "walk_join",
                     "crosswalk_join", "highway_speed", "stop_trigger"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise CraftError(f"ImportConfig.{name} must be positive and finite, got {v}")


def carla_to_world(xy) -> np.ndarray:
    """CARLA positions ``(..., 2)`` (left-handed, y flipped against OpenDRIVE) in the world's frame."""
    p = np.asarray(xy, dtype=np.float64)
    return np.stack([p[..., 0], -p[..., 1]], -1)


def carla_yaw_to_world(yaw_deg) -> np.ndarray | float:
    """A CARLA yaw (degrees, clockwise seen from above in the world frame) as a world heading (radians)."""
    return -np.deg2rad(yaw_deg)


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def map_cache_dir() -> Path:
    """Where imported maps are cached: ``$XDG_CACHE_HOME/craft/maps`` (``~/.cache/craft/maps``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "craft" / "maps"


# ---------------------------------------------------------------------------------------------- entry points
def load_opendrive(path: str | os.PathLike, cfg: ImportConfig = ImportConfig(), cache: bool = True,
                   name: str | None = None) -> RoadMap:
    """The road map of the OpenDRIVE file ``path`` (imported once, then read from the cache).

    ``name``: the map's name (default: the file's stem, e.g. ``Town04``). Raises :class:`CraftError` (one
    line) when the file is missing, unreadable or no OpenDRIVE map."""
    path = Path(path)
    if not path.exists():
        raise CraftError(f"map file '{path}' does not exist")
    if path.is_dir():
        raise CraftError(f"map file '{path}' is a folder, not an OpenDRIVE (.xodr) file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CraftError(f"map file '{path}' cannot be read ({e.strerror or type(e).__name__})") from None
    name = name or path.stem
    key = hashlib.sha256(data + json.dumps([IMPORT_VERSION, asdict(cfg), name]).encode()).hexdigest()[:24]
    target = map_cache_dir() / f"{name}_{key}.npz"
    if cache and target.exists():
        try:
            return _read_cached(target)
        except Exception:  # a damaged cache entry is made again
            pass
    m = import_opendrive(data, name, cfg, where=str(path))
    if cache:
        try:
            _write_cached(target, m)
        except OSError:
            pass  # a read-only cache costs time, not correctness
    return m


def import_opendrive(data: bytes | str, name: str, cfg: ImportConfig = ImportConfig(), where: str = "") -> RoadMap:
    """Import OpenDRIVE text (no cache). ``where`` names the source in error messages."""
    where = where or name
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise CraftError(f"map file '{where}' is not OpenDRIVE: not well-formed XML ({e})") from None
    if root.tag != "OpenDRIVE" or root.find("road") is None:
        raise CraftError(f"map file '{where}' is not OpenDRIVE: expected an <OpenDRIVE> root with <road>s, "
                         f"found <{root.tag}>")
    try:
        import carla
    except ImportError:
        raise CraftError("importing OpenDRIVE maps needs the CARLA client: pip install carla==0.9.16") from None
    try:
        cmap = carla.Map(name, text)
    except Exception as e:  # noqa: BLE001 - the client raises plain RuntimeErrors
        raise CraftError(f"map file '{where}': the CARLA client cannot build it ({e})") from None
    return _Importer(cmap, root, name, cfg, where).run()


# ---------------------------------------------------------------------------------------------- cache
_ARRAYS = None


def _write_cached(target: Path, m: RoadMap) -> None:
    arrays = {k: v for k, v in vars(m).items() if isinstance(v, np.ndarray)}
    meta = {"name": m.name, "grid_shape": list(m.grid_shape), "extras": m.extras}
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    atomic_write(target, lambda f: f.write(buf.getvalue()))


def _read_cached(target: Path) -> RoadMap:
    with np.load(target, allow_pickle=False) as z:
        meta = json.loads(bytes(z["__meta__"]).decode())
        arrays = {k: z[k] for k in z.files if k != "__meta__"}
    return RoadMap(name=meta["name"], grid_shape=tuple(meta["grid_shape"]), extras=meta["extras"], **arrays)


# ---------------------------------------------------------------------------------------------- the import
def _key(w) -> tuple[int, int, int]:
    return (int(w.road_id), int(w.section_id), int(w.lane_id))


def _xy(w) -> np.ndarray:
    loc = w.transform.location
    return carla_to_world((loc.x, loc.y))


def _parse_speed(el) -> float | None:
    sp = el.find("speed")
    if sp is None:
        return None
    try:
        v = float(sp.get("max"))
    except (TypeError, ValueError):
        return None
    unit = (sp.get("unit") or "m/s").lower()
    v = v * (_MPH if unit == "mph" else _KMH if unit in ("km/h", "kmh") else 1.0)
    return v if v > 0 else None


class _Importer:
    def __init__(self, cmap, root, name: str, cfg: ImportConfig, where: str):
        self.cmap, self.root, self.name, self.cfg, self.where = cmap, root, name, cfg, where
        self.road_speed: dict[int, float] = {}
        self.sections: list[tuple[int, float, float, int, str]] = []  # road, s0, s1, lane id, type
        for road in root.findall("road"):
            try:
                rid = int(road.get("id"))
                length = float(road.get("length"))
            except (TypeError, ValueError):
                continue
            for t in road.findall("type"):
                v = _parse_speed(t)
                if v is not None:
                    self.road_speed.setdefault(rid, v)
            secs = road.findall("lanes/laneSection")
            starts = [float(s.get("s", 0.0)) for s in secs] + [length]
            for k, sec in enumerate(secs):
                for side in ("left", "right"):
                    for ln in sec.findall(f"{side}/lane"):
                        self.sections.append((rid, starts[k], starts[k + 1], int(ln.get("id")),
                                              (ln.get("type") or "").lower()))

    # -------------------------------------------------------------- driving lanes
    def run(self) -> RoadMap:
        import carla

        self.carla = carla
        cfg = self.cfg
        topo = self.cmap.get_topology()
        if not topo:
            raise CraftError(f"map file '{self.where}' has no driving lanes")
        starts: dict[tuple, object] = {}
        succ_keys: dict[tuple, list[tuple]] = defaultdict(list)
        for a, b in topo:
            ka, kb = _key(a), _key(b)
            starts.setdefault(ka, a)
            starts.setdefault(kb, b)
            if kb != ka and kb not in succ_keys[ka]:  # the client reports a dead end as its own successor
                succ_keys[ka].append(kb)
        for rid, s0, s1, lid, typ in self.sections:  # driving lanes the topology leaves out (no successor)
            if typ != "driving" or s1 - s0 < 0.5:
                continue
            try:
                w = self.cmap.get_waypoint_xodr(rid, lid, s0 + 1e-3 if lid < 0 else s1 - 1e-3)
            except RuntimeError:
                w = None
            if w is not None and w.lane_type == carla.LaneType.Driving:
                starts.setdefault(_key(w), w)
        keys = sorted(starts)
        self.index = {k: i for i, k in enumerate(keys)}
        lanes: list[RawLane] = []
        mids = []
        raw = []  # the client's samples and start / end headings of every driving lane (before the end join)
        jids = sorted({int(starts[k].junction_id) for k in keys if starts[k].is_junction})
        jindex = {j: i for i, j in enumerate(jids)}
        for k in keys:
            w0 = starts[k]
            wps = [w0] + list(w0.next_until_lane_end(cfg.step))
            pts = np.array([_xy(w) for w in wps])
            raw.append((pts, float(carla_yaw_to_world(wps[0].transform.rotation.yaw)),
                        float(carla_yaw_to_world(wps[-1].transform.rotation.yaw))))
            nxt = succ_keys.get(k, [])
            if nxt:
                p_end = _xy(starts[nxt[0]])
                if np.linalg.norm(p_end - pts[-1]) < 3 * cfg.step:
                    pts = np.vstack([pts, p_end[None]])
            keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-3])
            pts = pts[keep]
            if len(pts) < 2:
                w1 = w0.next(0.2)
                pts = np.vstack([pts[:1], _xy(w1[0])[None]]) if w1 else np.vstack([pts, pts + [0.2, 0.0]])
            widths = [float(w.lane_width) for w in wps if w.lane_width > 0]
            mids.append(wps)
            junction = jindex[int(w0.junction_id)] if w0.is_junction else -1
            speed = self.road_speed.get(k[0], cfg.default_speed)
            lanes.append(RawLane(points=pts, width=float(np.median(widths)) if widths else 3.5, speed_limit=speed,
                                 type=LaneType.DRIVING, road=-1 if junction >= 0 else k[0], junction=junction,
                                 successors=[self.index[s] for s in nxt if s in self.index]))
        # neighbours from the markings: a change is permitted where the marking permits it anywhere along the
        # lane (the route files' planner changes lanes wherever a waypoint permits it)
        for i, (k, wps) in enumerate(zip(keys, mids)):
            if lanes[i].junction >= 0:
                continue
            for w in wps[:: max(1, len(wps) // 12)] + [wps[-1]]:
                change = str(w.lane_change)
                for side, allowed in (("left", change in ("Left", "Both")), ("right", change in ("Right", "Both"))):
                    nb = w.get_left_lane() if side == "left" else w.get_right_lane()
                    if nb is None or nb.lane_type != carla.LaneType.Driving:
                        continue
                    j = self.index.get(_key(nb))
                    if j is None or j == i:
                        continue
                    same = (nb.lane_id > 0) == (w.lane_id > 0)
                    if same and allowed and getattr(lanes[i], side) < 0:
                        setattr(lanes[i], side, j)
                    elif not same and side == "left" and lanes[i].left_opposite < 0:
                        lanes[i].left_opposite = j
        # connectors: manoeuvre, speed
        for i, ln in enumerate(lanes):
            if ln.junction < 0:
                continue
            p, h0, h1 = raw[i]
            d = _wrap(h1 - h0)
            ln.turn = STRAIGHT if abs(d) < math.radians(30) else UTURN if abs(d) > math.radians(150) else (
                LEFT if d > 0 else RIGHT)
            preds = [j for j, o in enumerate(lanes) if i in o.successors]
            near = [lanes[j].speed_limit for j in preds + ln.successors]
            v = min(near) if near else cfg.default_speed
            kappa = _max_curvature(p)
            if kappa > 1e-4:
                v = min(v, max(3.0, math.sqrt(cfg.turn_lateral_accel / kappa)))
            ln.speed_limit = float(v)
        self.lanes = lanes
        self.preds = [[] for _ in lanes]
        for i, ln in enumerate(lanes):
            for j in ln.successors:
                self.preds[j].append(i)
        junctions, lights, stops, arms_of = self._junctions(jids)
        walk_tags = self._walks()
        extras = {"source": "opendrive", "file": Path(self.where).name, "seed": -1,
                  "features": self._features(junctions, arms_of, walk_tags)}
        return RoadMap.build(self.name, lanes, junctions, lights, stops, extras)

    # -------------------------------------------------------------- junctions, lights, stop signs
    def _signal_lanes(self, type_code: str) -> set[int]:
        """Incoming lanes (outside junctions) that the file's signals of ``type_code`` stand at."""
        out: set[int] = set()
        for lm in self.cmap.get_all_landmarks_of_type(type_code):
            ids = set()
            for lo, hi in lm.get_lane_validities():
                lo, hi = min(lo, hi), max(lo, hi)
                ids.update(x for x in range(lo, hi + 1) if x != 0)
            if not ids:
                ids = {-1, 1}
            found = False
            for lid in sorted(ids):
                try:
                    w = self.cmap.get_waypoint_xodr(int(lm.road_id), int(lid), float(lm.s))
                except RuntimeError:
                    w = None
                if w is None or w.lane_type != self.carla.LaneType.Driving:
                    continue
                i = self.index.get(_key(w))
                if i is None:
                    continue
                found = True
                out.update(self._incoming_of(i))
            if not found and lm.waypoint is not None:
                i = self.index.get(_key(lm.waypoint))
                if i is not None:
                    out.update(self._incoming_of(i))
        return out

    def _incoming_of(self, i: int) -> list[int]:
        ln = self.lanes[i]
        if ln.junction >= 0:
            return [p for p in self.preds[i] if self.lanes[p].junction < 0]
        if any(self.lanes[s].junction >= 0 for s in ln.successors):
            return [i]
        return []

    def _junctions(self, jids: list[int]):
        cfg, lanes = self.cfg, self.lanes
        lit = self._signal_lanes("1000001")
        stop = self._signal_lanes("206")
        junctions, lights, stops, arms_of = [], [], [], []
        conns_by_j = defaultdict(list)
        for i, ln in enumerate(lanes):
            if ln.junction >= 0:
                conns_by_j[ln.junction].append(i)
        for j, cj in enumerate(jids):
            conns = conns_by_j[j]
            jn = self.cmap.get_waypoint_xodr  # noqa: F841 (keeps the client alive in this scope)
            pts = np.concatenate([lanes[c].points for c in conns])
            lo, hi = pts.min(0), pts.max(0)
            center = (lo + hi) / 2
            radius = float(max(2.0, np.linalg.norm(hi - lo) / 2))
            incoming = sorted({p for c in conns for p in self.preds[c] if lanes[p].junction < 0})
            outgoing = sorted({s for c in conns for s in lanes[c].successors if lanes[s].junction < 0})
            # arms: incoming and outgoing lanes grouped by road
            arm_roads = sorted({lanes[x].road for x in incoming + outgoing})
            arms = []
            for r in arm_roads:
                inc = [x for x in incoming if lanes[x].road == r]
                out = [x for x in outgoing if lanes[x].road == r]
                dirs = [-_unit_dir(lanes[x].points[-2:]) for x in inc] + [_unit_dir(lanes[x].points[:2]) for x in out]
                d = np.mean(dirs, axis=0)
                u = d / max(np.linalg.norm(d), 1e-6)
                arms.append(dict(road=r, incoming=inc, outgoing=out, direction=u,
                                 angle=math.atan2(u[1], u[0])))
            arms.sort(key=lambda a: a["angle"])
            has_light = [a for a in arms if set(a["incoming"]) & lit]
            has_stop = [a for a in arms if set(a["incoming"]) & stop]
            kind = JunctionKind.SIGNAL if has_light else JunctionKind.STOP if has_stop else JunctionKind.UNCONTROLLED
            for a in arms:  # the arm's straight movement: its connectors' manoeuvres
                a["turns"] = {lanes[c].turn for x in a["incoming"] for c in lanes[x].successors
                              if lanes[c].junction == j}
            n_phases = max(1, len(has_light))
            for ph, a in enumerate(has_light):
                a["phase"] = ph
                for x in a["incoming"]:
                    lights.append(RawLight(x, j, ph))
            for a in has_stop if kind == JunctionKind.STOP else []:
                a["stop"] = True
                for x in a["incoming"]:
                    stops.append(RawStop(x, j, cfg.stop_trigger))
            through = [a for a in arms if STRAIGHT in a["turns"]]
            all_stop = kind == JunctionKind.STOP and len(has_stop) == len(arms)
            for a in arms:
                major = a in through if kind != JunctionKind.STOP else not a.get("stop", False)
                a["major"] = bool(major)
                for x in a["incoming"]:
                    for c in lanes[x].successors:
                        if lanes[c].junction != j:
                            continue
                        t = lanes[c].turn
                        if kind == JunctionKind.SIGNAL:
                            pr = 1 if t in (LEFT, UTURN) else 2
                        elif all_stop:
                            pr = 1
                        else:
                            pr = {STRAIGHT: 2, RIGHT: 1}.get(t, 0) - (0 if major else 1)
                        lanes[c].priority = int(pr)
            cycle = n_phases * (cfg.green + cfg.yellow + cfg.all_red)
            offset = float((cj * 7919) % 1000) / 1000.0 * cycle
            junctions.append(RawJunction((float(center[0]), float(center[1])), radius, kind, green=cfg.green,
                                         yellow=cfg.yellow, all_red=cfg.all_red, n_phases=n_phases, offset=offset))
            arms_of.append(dict(id=j, carla_id=int(cj), kind=kind, arms=arms, conns=conns, center=center,
                                radius=radius, incoming=incoming, outgoing=outgoing))
        return junctions, lights, stops, arms_of

    # -------------------------------------------------------------- sidewalks and crosswalks
    def _walks(self) -> dict:
        cfg, carla = self.cfg, self.carla
        side_lines = []
        seen = set()
        for rid, s0, s1, lid, typ in self.sections:
            if typ != "sidewalk":
                continue
            if (rid, lid, s0) in seen or s1 - s0 < 1.0:
                continue
            seen.add((rid, lid, s0))
            wps = []
            for s in np.linspace(s0 + 1e-3, s1 - 1e-3, max(2, int(math.ceil((s1 - s0) / cfg.step)) + 1)):
                try:  # sampled by arc length: the client's lane walks are not safe on sidewalk lanes
                    w = self.cmap.get_waypoint_xodr(rid, lid, float(s))
                except RuntimeError:
                    w = None
                if w is not None and w.lane_type == carla.LaneType.Sidewalk:
                    wps.append(w)
            if len(wps) < 2:
                continue
            w = wps[len(wps) // 2]
            pts = np.array([_xy(x) for x in wps])
            keep = np.concatenate([[True], np.linalg.norm(np.diff(pts, axis=0), axis=1) > 1e-3])
            pts = pts[keep]
            if len(pts) >= 2 and np.linalg.norm(np.diff(pts, axis=0), axis=1).sum() > 1.0:
                side_lines.append((pts, float(w.lane_width) if w.lane_width > 0 else 2.0))
        cross = []
        poly: list = []
        for loc in self.cmap.get_crosswalks():
            p = carla_to_world((loc.x, loc.y))
            if poly and np.linalg.norm(p - poly[0]) < 1e-3 and len(poly) >= 3:
                cross.append(np.array(poly))
                poly = []
            else:
                poly.append(p)
        cross_lines = []
        for P in cross:
            c = P.mean(0)
            _, _, vt = np.linalg.svd(P - c)
            ax, nx = vt[0], vt[1]
            a = (P - c) @ ax
            b = (P - c) @ nx
            if a.max() - a.min() < 1.0:
                continue
            cross_lines.append((np.stack([c + ax * a.min(), c + ax * a.max()]), float(max(1.0, b.max() - b.min()))))
        # cut sidewalks where crosswalk ends meet them
        pieces = []  # (points, width, type)
        ends = [e for line, _ in cross_lines for e in (line[0], line[1])]
        for pts, w in side_lines:
            cuts = []
            for e in ends:
                d = np.linalg.norm(pts - e, axis=1)
                k = int(np.argmin(d))
                if d[k] <= cfg.crosswalk_join and 1 <= k <= len(pts) - 2:
                    cuts.append(k)
            cuts = sorted(set(cuts))
            bounds = [0] + cuts + [len(pts) - 1]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a:
                    pieces.append((pts[a : b + 1], w, LaneType.SIDEWALK))
        for line, w in cross_lines:
            pieces.append((line, w, LaneType.CROSSWALK))
        # two opposite lanes per piece, joined at their ends
        base = len(self.lanes)
        made = []  # (lane, reverse, start point, end point, type)
        tags = {"sidewalks": [], "crosswalks": [], "crosswalk_lines": []}
        for pts, w, typ in pieces:
            f = len(self.lanes)
            self.lanes.append(RawLane(points=pts, width=w, speed_limit=1.5, type=typ))
            r = len(self.lanes)
            self.lanes.append(RawLane(points=pts[::-1].copy(), width=w, speed_limit=1.5, type=typ))
            made += [(f, r, pts[0], pts[-1], typ), (r, f, pts[-1], pts[0], typ)]
            tags["crosswalks" if typ == LaneType.CROSSWALK else "sidewalks"] += [f, r]
        if made:
            starts = np.array([m[2] for m in made])
            is_cross = np.array([m[4] == LaneType.CROSSWALK for m in made])
            for lane, rev, _, end, typ in made:
                d = np.linalg.norm(starts - end, axis=1)
                reach = np.where(is_cross | (typ == LaneType.CROSSWALK), cfg.crosswalk_join, cfg.walk_join)
                succ = [base + k for k in np.nonzero(d <= reach)[0] if base + k not in (lane, rev)]
                self.lanes[lane].successors = [int(x) for x in succ]
        return tags

    # -------------------------------------------------------------- features for scenario placement
    def _features(self, junctions, arms_of, walk_tags) -> dict:
        cfg, lanes = self.cfg, self.lanes
        driving = [i for i, ln in enumerate(lanes) if ln.type == LaneType.DRIVING and ln.junction < 0]
        cw_lanes = walk_tags["crosswalks"]
        jinfo = []
        names = {STRAIGHT: "straight", LEFT: "left", RIGHT: "right"}
        for rec in arms_of:
            j = rec["id"]
            conns = {"straight": [], "left": [], "right": []}
            for c in rec["conns"]:
                if lanes[c].turn in names:
                    conns[names[lanes[c].turn]].append(c)
            arm_info = []
            for a in rec["arms"]:
                cws = []
                ends = [lanes[x].points[-1] for x in a["incoming"]] + [lanes[x].points[0] for x in a["outgoing"]]
                for k in range(0, len(cw_lanes), 2):
                    mid = lanes[cw_lanes[k]].points.mean(0)
                    if np.linalg.norm(mid - rec["center"]) <= rec["radius"] + 15.0 and ends and \
                            min(np.linalg.norm(np.array(ends) - mid, axis=1)) < 12.0:
                        cws += [cw_lanes[k], cw_lanes[k + 1]]
                arm_info.append({"direction": [float(a["direction"][0]), float(a["direction"][1])],
                                 "road_kind": "highway" if any(lanes[x].speed_limit >= cfg.highway_speed
                                                               for x in a["incoming"] + a["outgoing"]) else "street",
                                 "incoming": list(a["incoming"]), "outgoing": list(a["outgoing"]),
                                 "major": bool(a["major"]), "phase": int(a.get("phase", -1)),
                                 "stop": bool(a.get("stop", False)), "crosswalk": cws, "road": int(a["road"])})
            jinfo.append({"id": j, "carla_id": rec["carla_id"], "kind": int(rec["kind"]),
                          "kind_name": JunctionKind(rec["kind"]).name, "arms": len(rec["arms"]),
                          "center": [float(rec["center"][0]), float(rec["center"][1])], "radius": rec["radius"],
                          "terminal": False, "minor_stop": False, "incoming": rec["incoming"],
                          "outgoing": rec["outgoing"], "connectors": conns,
                          "arm_info": arm_info, "crosswalks": sorted({c for a in arm_info for c in a["crosswalk"]})})
        multi = [i for i in driving if lanes[i].left >= 0 or lanes[i].right >= 0]
        two_way = [i for i in driving if lanes[i].left_opposite >= 0 and lanes[i].left < 0 and lanes[i].right < 0]
        highway = [i for i in driving if lanes[i].speed_limit >= cfg.highway_speed]
        curves = []
        for i in driving:
            p = lanes[i].points
            if len(p) >= 3:
                h = np.arctan2(np.diff(p[:, 1]), np.diff(p[:, 0]))
                if abs(float(np.sum(np.angle(np.exp(1j * np.diff(h)))))) > 0.2:
                    curves.append(i)
        return {"two_way_single_lane": two_way, "highway": highway, "highway_links": [], "ramp_roads": [],
                "on_ramps": [], "off_ramps": [], "acceleration_lanes": [], "deceleration_lanes": [],
                "shoulders": [], "parking": [], "bike": [], "crosswalks": sorted(cw_lanes),
                "sidewalks": sorted(walk_tags["sidewalks"]), "curves": curves, "multi_lane": multi,
                "junctions": jinfo,
                "connectors": sorted(i for i, ln in enumerate(lanes) if ln.junction >= 0)}


def _unit_dir(p: np.ndarray) -> np.ndarray:
    d = np.asarray(p[-1], dtype=np.float64) - np.asarray(p[0], dtype=np.float64)
    return d / max(float(np.linalg.norm(d)), 1e-9)


def _max_curvature(p: np.ndarray) -> float:
    if len(p) < 3:
        return 0.0
    d1 = np.gradient(p, axis=0)
    d2 = np.gradient(d1, axis=0)
    num = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
    den = np.maximum(np.linalg.norm(d1, axis=1) ** 3, 1e-12)
    k = (num / den)[1:-1]
    # a 3-point window on 1 m samples: smooth a little so single kinks do not dominate
    if len(k) >= 5:
        k = np.convolve(k, np.ones(5) / 5, mode="valid")
    return float(k.max()) if len(k) else 0.0
