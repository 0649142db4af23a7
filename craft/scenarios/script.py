"""Data-driven, batched scenario scripts: triggers and actions packed as padded ``(B, E)`` tensors.

A scenario's script is a short list of :class:`Rule` ``(agent, trigger, action)``. :func:`pack` stacks the
rules of ``B`` worlds into a :class:`ScriptTable` (``E`` = most rules of any world, padded with
never-firing rules). :func:`apply` evaluates every trigger of every world at once (tensor code, no Python
loop over worlds or rules) and applies the actions of the rules that fire functionally
(``state.replace``); call it once per step, before :meth:`World.step`::

    table = pack([inst.rules for inst in instances])
    for _ in range(T):
        state, table = apply(state, table)
        control = policy(...) + table.ego_perturbation     # ControlLoss: (accel, steer) offsets
        state, events = world.step(state, control)

A rule fires at most once. Agent indices are world indices: the ego is 0, the scenario's explicit agents
(``WorldSpec.agents``) are 1..k in order. For :meth:`Action.light` the rule's ``agent`` is a *light index*
of the map instead.

Triggers (``Trigger.*``): ego within ``d`` of an agent / of a point; ego time to arrival at a point below ``t``
(or within a minimum distance of it); ego time-to-collision to an agent below ``t``; elapsed time; ego route
progress past ``m`` metres; another rule already fired (+ a delay).

Actions (``Action.*``): release ``hold``; set ``speed_override`` / ``v_des``; switch to FREE mode with a
heading and speed (pedestrian stepping out); cut into a lane (re-anchor on the ego's lane with a lateral
offset that the world's lane-change model decays: a smooth cut-in); set a behaviour / siren flag; show or
hide an agent (``valid``); force a light colour (``light_override``; -1 gives the light back to its
cycle); perturb the ego control for a while (``table.ego_perturbation``, read by the runner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from craft.errors import CraftError
from craft.world.map import MapBatch, lane_candidates
from craft.world.state import QUEUE, Mode, WorldState

# ---------------------------------------------------------------------- codes
T_NONE = 0  # padding: never fires
T_NEAR_AGENT = 1  # p0: distance d
T_NEAR_POINT = 2  # p0, p1: x, y; p2: d
T_TTC = 3  # p0: time t (s); p1: max distance considered
T_TIME = 4  # p0: elapsed seconds
T_PROGRESS = 5  # p0: route metres
T_AFTER = 6  # trig_agent holds the rule index; p0: delay after it fired (s)
T_ARRIVAL = 7  # p0, p1: x, y; p2: time t (s); p3: distance d (the ego arrives within t s, or is within d m)
TRIGGER_PARAMS = 4  # parameters per trigger
ARRIVAL_MIN_SPEED = 0.1  # m/s; a slower ego never arrives (Bench2Drive's time to arrival is infinite then)

A_NONE = 0
A_RELEASE = 1  # hold := False; speed := p0 when p0 > 0 (start already moving)
A_SPEED = 2  # speed_override := p0 (NaN clears)
A_FREE = 3  # mode := FREE, yaw := p0 (+ current yaw if p2 != 0), speed_override := p1
A_FLAG = 4  # flag p0 (FLAGS index) := p1 != 0
A_LIGHT = 5  # light_override[agent] := p0 (-1 = back to the cycle)
A_PERTURB = 6  # ego_perturbation := (p0, p1) for p2 seconds
A_CUT_IN = 7  # LANE mode on lane p0 (-1: the ego's current lane), lateral offset kept, queue = ego's
A_V_DES = 8  # v_des := p0
A_VALID = 9  # valid := p0 != 0 (hide / show an agent)
A_OFFSET = 10  # sustained: lateral offset := p0 (left positive) for p1 seconds after firing (lane agents)

FLAGS = ("ignore_lights", "ignore_stops", "ignore_priority", "react_ego", "siren", "lane_changes", "ignore_vehicles")

TRIGGER_NAMES = {T_NONE: "none", T_NEAR_AGENT: "near_agent", T_NEAR_POINT: "near_point", T_TTC: "ttc",
                 T_TIME: "time", T_PROGRESS: "progress", T_AFTER: "after", T_ARRIVAL: "arrival"}
ACTION_NAMES = {A_NONE: "none", A_RELEASE: "release", A_SPEED: "speed", A_FREE: "free", A_FLAG: "flag",
                A_LIGHT: "light", A_PERTURB: "perturb", A_CUT_IN: "cut_in", A_V_DES: "v_des", A_VALID: "valid",
                A_OFFSET: "offset"}


@dataclass(frozen=True)
class Trigger:
    kind: int
    agent: int = -1  # agent the trigger measures against (T_NEAR_AGENT, T_TTC) or rule index (T_AFTER)
    params: tuple = (0.0, 0.0, 0.0, 0.0)

    @staticmethod
    def near_agent(agent: int, d: float) -> "Trigger":
        """The ego is within ``d`` m (centre to centre) of ``agent``."""
        return Trigger(T_NEAR_AGENT, agent, (float(d), 0.0, 0.0))

    @staticmethod
    def near_point(x: float, y: float, d: float) -> "Trigger":
        """The ego is within ``d`` m of the point ``(x, y)``."""
        return Trigger(T_NEAR_POINT, -1, (float(x), float(y), float(d)))

    @staticmethod
    def ttc(agent: int, t: float, max_dist: float = 60.0) -> "Trigger":
        """The ego's time to collision with ``agent`` (constant velocities, bumper gap) is below ``t`` s."""
        return Trigger(T_TTC, agent, (float(t), float(max_dist), 0.0))

    @staticmethod
    def time(t: float) -> "Trigger":
        """At least ``t`` s since reset."""
        return Trigger(T_TIME, -1, (float(t), 0.0, 0.0))

    @staticmethod
    def progress(m: float) -> "Trigger":
        """The ego's route progress passed ``m`` metres."""
        return Trigger(T_PROGRESS, -1, (float(m), 0.0, 0.0))

    @staticmethod
    def arrival(x: float, y: float, t: float, d: float = 0.0) -> "Trigger":
        """The ego's time to arrival at the point ``(x, y)`` -- straight-line distance over its current speed,
        as Bench2Drive's ``InTimeToArrivalToLocation`` -- is below ``t`` s, or the ego is within ``d`` m of it
        (Bench2Drive's minimum trigger distance, for an ego that comes slowly or stops)."""
        return Trigger(T_ARRIVAL, -1, (float(x), float(y), float(t), float(d)))

    @staticmethod
    def after(rule: int, delay: float = 0.0) -> "Trigger":
        """Rule number ``rule`` (of the same world) fired at least ``delay`` s ago."""
        return Trigger(T_AFTER, int(rule), (float(delay), 0.0, 0.0))


@dataclass(frozen=True)
class Action:
    kind: int
    params: tuple = (0.0, 0.0, 0.0)

    @staticmethod
    def release(speed: float = 0.0) -> "Action":
        """Release ``hold``; with ``speed > 0`` the agent starts at that speed (a held agent stands still)."""
        return Action(A_RELEASE, (float(speed), 0.0, 0.0))

    @staticmethod
    def speed(v: float) -> "Action":
        """Set ``speed_override`` (NaN clears it)."""
        return Action(A_SPEED, (float(v), 0.0, 0.0))

    @staticmethod
    def free(yaw: float, speed: float, relative: bool = False) -> "Action":
        """FREE mode: hold heading ``yaw`` (absolute, or added to the current yaw) at ``speed``."""
        return Action(A_FREE, (float(yaw), float(speed), 1.0 if relative else 0.0))

    @staticmethod
    def flag(name: str, value: bool = True) -> "Action":
        if name not in FLAGS:
            raise CraftError(f"unknown script flag '{name}' (one of {FLAGS})")
        return Action(A_FLAG, (float(FLAGS.index(name)), 1.0 if value else 0.0, 0.0))

    @staticmethod
    def light(state: int) -> "Action":
        """Force the rule's light (``Rule.agent`` is a light index) to ``state``; -1 releases it."""
        return Action(A_LIGHT, (float(state), 0.0, 0.0))

    @staticmethod
    def perturb(accel: float, steer: float, duration: float) -> "Action":
        """ControlLoss: the runner adds ``(accel, steer)`` to the ego control for ``duration`` s."""
        return Action(A_PERTURB, (float(accel), float(steer), float(duration)))

    @staticmethod
    def cut_in(lane: int = -1, speed: float = float("nan"), initial_speed: float = 0.0) -> "Action":
        """Re-anchor the agent on ``lane`` (-1: the ego's current lane) keeping its lateral offset, so the
        world's lane-change model steers it across; optional new ``speed_override`` (a negative value -k means
        k times the ego's speed at that moment) and, when > 0, the speed it has at once (e.g. a held car that
        should already be rolling)."""
        return Action(A_CUT_IN, (float(lane), float(speed), float(initial_speed)))

    @staticmethod
    def v_des(v: float) -> "Action":
        return Action(A_V_DES, (float(v), 0.0, 0.0))

    @staticmethod
    def offset(lateral: float, duration: float) -> "Action":
        """Keep the agent ``lateral`` m left of its lane centre (negative: right) for ``duration`` s, e.g. an
        oncoming car invading the ego lane on a bend. Re-applied every step while active."""
        return Action(A_OFFSET, (float(lateral), float(duration), 0.0))

    @staticmethod
    def valid(show: bool) -> "Action":
        """Show (``True``) or hide an agent; a hidden agent is ignored by the whole world."""
        return Action(A_VALID, (1.0 if show else 0.0, 0.0, 0.0))


@dataclass(frozen=True)
class Rule:
    """``agent`` gets ``action`` once ``trigger`` holds (light index for :meth:`Action.light`)."""

    agent: int
    trigger: Trigger
    action: Action
    name: str = ""


@dataclass
class ScriptTable:
    """All rules of ``B`` worlds as padded tensors; ``E`` rules per world."""

    trig_type: torch.Tensor  # (B, E) long
    trig_agent: torch.Tensor  # (B, E) long (rule index for T_AFTER)
    trig_p: torch.Tensor  # (B, E, TRIGGER_PARAMS)
    act_type: torch.Tensor  # (B, E) long
    act_agent: torch.Tensor  # (B, E) long
    act_p: torch.Tensor  # (B, E, 3)
    fired: torch.Tensor  # (B, E) bool
    fired_time: torch.Tensor  # (B, E) seconds when fired (inf not yet)
    ego_perturbation: torch.Tensor  # (B, 2) (accel, steer) offsets the runner adds to the ego control
    perturb_value: torch.Tensor  # (B, 2) offsets of the latest perturbation rule
    perturb_until: torch.Tensor  # (B,) seconds; the perturbation is active while t < perturb_until

    def replace(self, **kw) -> "ScriptTable":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return ScriptTable(**d)

    def to(self, device) -> "ScriptTable":
        return ScriptTable(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def index(self, idx) -> "ScriptTable":
        return ScriptTable(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def clone(self) -> "ScriptTable":
        return ScriptTable(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    @property
    def num_rules(self) -> int:
        return int(self.trig_type.shape[1])


def pack(rules: list[list[Rule]], device="cpu") -> ScriptTable:
    """Stack per-world rule lists into a :class:`ScriptTable` (padding never fires)."""
    B = len(rules)
    if B == 0:
        raise CraftError("pack needs at least one world's rule list")
    E = max(1, max(len(r) for r in rules))
    tt = torch.zeros(B, E, dtype=torch.long)
    ta = torch.full((B, E), -1, dtype=torch.long)
    tp = torch.zeros(B, E, TRIGGER_PARAMS)
    at = torch.zeros(B, E, dtype=torch.long)
    aa = torch.full((B, E), -1, dtype=torch.long)
    ap = torch.zeros(B, E, 3)
    for b, rl in enumerate(rules):
        for e, r in enumerate(rl):
            if r.trigger.kind not in TRIGGER_NAMES or r.action.kind not in ACTION_NAMES:
                raise CraftError(f"world {b} rule {e}: unknown trigger {r.trigger.kind} or action {r.action.kind}")
            if r.trigger.kind == T_AFTER and not 0 <= r.trigger.agent < len(rl):
                raise CraftError(f"world {b} rule {e}: chained to rule {r.trigger.agent}, which does not exist")
            tt[b, e] = r.trigger.kind
            ta[b, e] = r.trigger.agent
            tp[b, e] = torch.tensor([float(x) for x in (tuple(r.trigger.params) + (0.0,) * TRIGGER_PARAMS)
                                     [:TRIGGER_PARAMS]])
            at[b, e] = r.action.kind
            aa[b, e] = r.agent
            ap[b, e] = torch.tensor([float(x) for x in (tuple(r.action.params) + (0.0,) * 3)[:3]])
    return ScriptTable(tt, ta, tp, at, aa, ap, torch.zeros(B, E, dtype=torch.bool), torch.full((B, E), math.inf),
                       torch.zeros(B, 2), torch.zeros(B, 2), torch.full((B,), -math.inf)).to(device)


def trigger_point(trigger: Trigger, ego_speed: float) -> tuple[float, float, float] | None:
    """``(x, y, d)`` of a point trigger: the ego fires it within ``d`` m of ``(x, y)`` (near_point: its distance;
    arrival: the larger of its minimum distance and the distance an ego at ``ego_speed`` covers in its time);
    None for the other triggers."""
    p = [float(v) for v in trigger.params]
    if trigger.kind == T_NEAR_POINT:
        return p[0], p[1], p[2]
    if trigger.kind == T_ARRIVAL:
        return p[0], p[1], max(p[3], p[2] * ego_speed)
    return None


def _gather_agent(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, ...) at per-rule agent indices idx (B, E) (clamped; check validity separately)."""
    i = idx.clamp(0, x.shape[1] - 1)
    if x.dim() == 2:
        return torch.gather(x, 1, i)
    return torch.gather(x, 1, i[..., None].expand(-1, -1, x.shape[2]))


def ego_ttc(state: WorldState, agent: torch.Tensor) -> torch.Tensor:
    """(B, E) time to collision of the ego with ``agent (B, E)``: bumper-to-bumper distance over the closing
    speed along the line of sight (inf when not closing)."""
    p0 = state.pos[:, :1]  # (B, 1, 2)
    v0 = state.speed[:, :1, None] * torch.stack([torch.cos(state.yaw[:, :1]), torch.sin(state.yaw[:, :1])], -1)
    pa = _gather_agent(state.pos, agent)
    ya = _gather_agent(state.yaw, agent)
    va = _gather_agent(state.speed, agent)[..., None] * torch.stack([torch.cos(ya), torch.sin(ya)], -1)
    r = pa - p0
    dist = r.norm(dim=-1).clamp_min(1e-3)
    closing = -((r * (va - v0)).sum(-1)) / dist
    gap = (dist - 0.5 * (state.length[:, :1] + _gather_agent(state.length, agent))).clamp_min(0.0)
    return torch.where(closing > 0.05, gap / closing.clamp_min(0.05), torch.full_like(gap, math.inf))


def triggers(state: WorldState, table: ScriptTable, t: torch.Tensor) -> torch.Tensor:
    """(B, E) bool: which not-yet-fired rules fire now."""
    tt, p = table.trig_type, table.trig_p
    ego = state.pos[:, 0][:, None, :]  # (B, 1, 2)
    a = table.trig_agent
    a_ok = (a >= 0) & (a < state.num_agents) & _gather_agent(state.valid, a)
    d_agent = (_gather_agent(state.pos, a) - ego).norm(dim=-1)
    d_point = (p[..., :2] - ego).norm(dim=-1)
    v_ego = state.speed[:, :1]  # (B, 1)
    arrival = torch.where(v_ego > ARRIVAL_MIN_SPEED, d_point / v_ego.clamp_min(ARRIVAL_MIN_SPEED),
                          torch.full_like(d_point, math.inf))
    ttc = ego_ttc(state, a)
    tcol = t[:, None].expand_as(p[..., 0])
    prev_fired = torch.gather(table.fired, 1, a.clamp(0, table.num_rules - 1))
    prev_time = torch.gather(table.fired_time, 1, a.clamp(0, table.num_rules - 1))
    fire = torch.zeros_like(table.fired)
    fire |= (tt == T_NEAR_AGENT) & a_ok & (d_agent <= p[..., 0])
    fire |= (tt == T_NEAR_POINT) & (d_point <= p[..., 2])
    fire |= (tt == T_TTC) & a_ok & (ttc <= p[..., 0]) & (d_agent <= p[..., 1])
    fire |= (tt == T_TIME) & (tcol >= p[..., 0] - 1e-6)
    fire |= (tt == T_PROGRESS) & (state.progress[:, None] >= p[..., 0])
    fire |= (tt == T_ARRIVAL) & ((arrival < p[..., 2]) | (d_point < p[..., 3]))
    fire |= (tt == T_AFTER) & prev_fired & (tcol - prev_time >= p[..., 0] - 1e-6)
    return fire & ~table.fired & ~state.done[:, None]


def _per_agent(mask: torch.Tensor, agent: torch.Tensor, val: torch.Tensor, N: int):
    """Scatter rule values onto agents: (hit (B, N) bool, value (B, N)); the last firing rule wins."""
    B, E = mask.shape
    ok = mask & (agent >= 0) & (agent < N)
    onehot = ok[..., None] & (agent[..., None] == torch.arange(N, device=agent.device))  # (B, E, N)
    hit = onehot.any(1)
    order = torch.arange(1, E + 1, device=agent.device, dtype=torch.float32)[None, :, None]
    last = torch.where(onehot, order, torch.zeros_like(order)).argmax(1, keepdim=True)  # (B, 1, N)
    v = torch.gather(val[..., None].expand(-1, -1, N), 1, last).squeeze(1)
    return hit, v


def apply(state: WorldState, table: ScriptTable, t=None, maps: MapBatch | None = None, dt: float = 0.1):
    """Evaluate every trigger and apply the firing rules' actions. Returns ``(state, table)``.

    t: current time in seconds, scalar or (B,) (default ``state.step * dt``). ``maps`` is needed only by
    :meth:`Action.cut_in` (to project the agent onto its new lane); without it a cut-in keeps the arc
    length of the agent's old lane.
    """
    B, N = state.batch_size, state.num_agents
    dev = state.device
    if t is None:
        t = state.step.to(torch.float32) * dt
    t = torch.as_tensor(t, dtype=torch.float32, device=dev).expand(B)
    fire = triggers(state, table, t)
    at, aa, ap = table.act_type, table.act_agent, table.act_p
    fired = table.fired | fire
    fired_time = torch.where(fire, t[:, None].expand_as(table.fired_time), table.fired_time)

    kw = {}

    def upd(name, hit, value):
        cur = kw.get(name, getattr(state, name))
        kw[name] = torch.where(hit, value.to(cur.dtype), cur)

    if bool(fire.any()):
        m = fire & (at == A_RELEASE)
        hit, v = _per_agent(m, aa, ap[..., 0], N)
        upd("hold", hit, torch.zeros_like(state.hold))
        upd("speed", hit & (v > 0), v)

        hit, v = _per_agent(fire & (at == A_SPEED), aa, ap[..., 0], N)
        upd("speed_override", hit, v)

        hit, v = _per_agent(fire & (at == A_V_DES), aa, ap[..., 0], N)
        upd("v_des", hit, v)

        hit, v = _per_agent(fire & (at == A_VALID), aa, ap[..., 0], N)
        upd("valid", hit, v > 0.5)

        m = fire & (at == A_FREE)
        hit, yaw = _per_agent(m, aa, ap[..., 0], N)
        _, spd = _per_agent(m, aa, ap[..., 1], N)
        _, rel = _per_agent(m, aa, ap[..., 2], N)
        new_yaw = torch.where(rel > 0.5, state.yaw + yaw, yaw)
        new_yaw = torch.remainder(new_yaw + math.pi, 2 * math.pi) - math.pi
        upd("yaw", hit, new_yaw)
        upd("speed_override", hit, spd)
        upd("mode", hit, torch.full_like(state.mode, Mode.FREE))
        upd("lane", hit, torch.full_like(state.lane, -1))
        upd("hold", hit, torch.zeros_like(state.hold))

        for k, name in enumerate(FLAGS):
            m = fire & (at == A_FLAG) & ((ap[..., 0] - k).abs() < 0.5)
            hit, v = _per_agent(m, aa, ap[..., 1], N)
            upd(name, hit, v > 0.5)

        m = fire & (at == A_CUT_IN)
        if bool(m.any()):
            _cut_in(state, m, aa, ap, kw, upd, maps)

        m = fire & (at == A_LIGHT)
        if bool(m.any()):
            K = state.light_override.shape[1]
            hit, v = _per_agent(m, aa, ap[..., 0], K)
            upd("light_override", hit, v.round().long())

    # sustained lateral offsets (checked every step, fired rules within their duration)
    m = fired & (at == A_OFFSET) & (t[:, None] - fired_time < ap[..., 1])
    if bool(m.any()):
        hit, v = _per_agent(m, aa, ap[..., 0], N)
        upd("offset", hit & (state.mode == Mode.LANE), v)

    # control perturbation (ControlLoss): the latest firing rule sets the offsets and the window end
    m = fire & (at == A_PERTURB)
    value, until = table.perturb_value, table.perturb_until
    if bool(m.any()):
        idx = torch.where(m, torch.arange(m.shape[1], device=dev)[None], torch.full_like(aa, -1)).argmax(1)
        anym = m.any(1)
        p = ap[torch.arange(B, device=dev), idx]  # (B, 3)
        value = torch.where(anym[:, None], p[:, :2], value)
        until = torch.where(anym, t + p[:, 2], until)
    active = t < until
    table = table.replace(fired=fired, fired_time=fired_time, perturb_value=value, perturb_until=until,
                          ego_perturbation=torch.where(active[:, None], value, torch.zeros_like(value)))
    return (state.replace(**kw) if kw else state), table


def _cut_in(state, m, aa, ap, kw, upd, maps):
    """Re-anchor agents on a new lane with their current lateral offset (lane-change model takes over)."""
    B, N = state.batch_size, state.num_agents
    hit, lane_p = _per_agent(m, aa, ap[..., 0], N)
    _, spd = _per_agent(m, aa, ap[..., 1], N)
    ego_lane = state.lane[:, :1].expand(B, N)
    target = torch.where(lane_p < -0.5, ego_lane, lane_p.round().long())
    hit = hit & (target >= 0)
    s_new = state.s
    offset = torch.zeros_like(state.s)
    if maps is not None and bool(hit.any()):
        bi, ni = hit.nonzero(as_tuple=True)
        cand = lane_candidates(maps, state.map_id[bi], state.pos[bi, ni])
        mine = cand["ok"] & (cand["lane"] == target[bi, ni][:, None])
        dist = torch.where(mine, cand["dist"], torch.full_like(cand["dist"], math.inf))
        k = dist.argmin(1, keepdim=True)
        found = torch.gather(mine, 1, k).squeeze(1)
        s_k = torch.gather(cand["s"], 1, k).squeeze(1)
        lat = torch.gather(cand["lateral"], 1, k).squeeze(1)
        s_new = state.s.clone()
        offset = torch.zeros_like(state.s)
        s_new[bi, ni] = torch.where(found, s_k, state.s[bi, ni])
        offset[bi, ni] = torch.where(found, lat, torch.zeros_like(lat))
    ego_q = state.queue[:, :1].expand(B, N, QUEUE)
    same_as_ego = (target == ego_lane)[..., None]
    queue = torch.where(same_as_ego, ego_q, torch.full_like(state.queue, -1))
    upd("lane", hit, target)
    upd("s", hit, s_new)
    upd("offset", hit, offset)
    kw["queue"] = torch.where(hit[..., None], queue, kw.get("queue", state.queue))
    upd("mode", hit, torch.full_like(state.mode, Mode.LANE))
    upd("hold", hit, torch.zeros_like(state.hold))
    upd("lane_changes", hit, torch.zeros_like(state.lane_changes))
    spd = torch.where(spd < 0, -spd * state.speed[:, :1], spd)  # relative to the ego's speed
    spd_ok = hit & torch.isfinite(spd)
    upd("speed_override", spd_ok, spd)
    _, v0 = _per_agent(m, aa, ap[..., 2], N)
    upd("speed", hit & (v0 > 0), v0)


def set_queues(state: WorldState, queues: list[dict[int, list[int]]]) -> WorldState:
    """Pin the upcoming lanes of scripted agents (``queues[b][agent] = [lane, ...]``), e.g. so a crossing
    vehicle goes straight through its junction instead of a random successor. Call once after reset."""
    q = state.queue.clone()
    for b, d in enumerate(queues):
        for n, lanes in d.items():
            lanes = [int(x) for x in lanes[:QUEUE]]
            q[b, n] = -1
            if lanes:
                q[b, n, : len(lanes)] = torch.tensor(lanes, device=q.device)
    return state.replace(queue=q)


__all__ = ["Rule", "Trigger", "Action", "ScriptTable", "pack", "apply", "triggers", "ego_ttc", "set_queues", "FLAGS",
           "trigger_point"]
