"""Collection, proxy scoring and evaluation on Ray workers (every core of a machine, or a Ray cluster).

Fine-tuning (:class:`RayCollector`, used by :class:`~craft.finetune.trainer.Trainer` when ``workers > 1`` or
an ``address`` is given): ``n`` Ray actors, each one torch thread, each its own batched world over every
``n``-th route of the collector's seeded route order (``Collector(shard=(i, n))``), ``worlds`` routes in
parallel (as one process) and ``buffer_size / n`` transitions per iteration, so each world takes ``1 / n``
of the decisions per iteration. The driver's update then uses ``n`` torch threads (the workers' cores are
idle meanwhile). Every iteration the driver puts the current
policy weights (pi_old) in Ray's object store once; every worker loads them, collects its share of the
buffer on-policy and scores its own states in its own counterfactual world; the driver merges the buffers
and scores (worker order, so a fixed ``n`` and seed give the same run), updates the policy and sends the
new weights with the next call. Only the driver writes files (checkpoints, diagnostics).

The merged buffer stacks the workers' ``(T_i, W_i)`` buffers along the decision axis (``W`` padded with
non-live columns); every worker's last row has ``notdone = False``, so no return looks across workers.
It carries no world snapshots, tracker memory or candidate trajectories (``snapshot`` / ``tracker`` are
None, ``candidates.trajectories`` is ``(N, G, 0, 3)``): the workers scored them where they live, and the
update needs only observations, valid masks and the executed steps' events.

Faults: an actor that dies (killed, out of memory, its machine lost) is restarted by Ray
(``max_restarts``); its partial data of the iteration is dropped, it gets back its collector state of the
last completed iteration, and the iteration completes with the other workers' data (or, when every worker
died, is collected again). The ``workers/restarts`` diagnostic counts restarts over the run,
``workers/lost`` the workers whose data an iteration lost.

Evaluation (:func:`evaluate_sharded`): the evaluation's batches (``--batch-size`` consecutive routes, as
in one process) are dealt round-robin to ``n`` Ray tasks; each runs its batches and returns their
:class:`~craft.bench.metrics.RouteLog` s, which the driver puts back in route order and scores. A batch
drives exactly as in one process, so the records are the same bit for bit; the parallelism is the number
of batches (``--batch-size 110`` for 220 routes on 2 workers). Routes are not dealt one by one, because a
route's drive is not independent of the other routes in its batch at the last bit: on CPU the
vectorised transcendental kernels (sin, atan2, ...) round the tail of a tensor differently from its body,
and where a world's agents fall in the flattened ``(B, N)`` tensors depends on the batch (padding of N,
pair lists). Per-route seeding alone does not remove that.

Ray is imported lazily: ``import craft`` does not pay for it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Callable

import torch
from torch import Tensor

from craft.errors import CraftError
from craft.raytools import gpu_options, init_ray, ray_get


def _share(total: int, i: int, n: int) -> int:
    """Worker ``i``'s share of ``total`` over ``n`` workers (the first ``total % n`` get one more), >= 1."""
    return max(1, total // n + (1 if i < total % n else 0))


# ---------------------------------------------------------------------- the fine-tuning worker
class CollectWorker:
    """One Ray actor: a policy copy, a :class:`~craft.finetune.collector.Collector` over shard ``(index,
    count)`` and a counterfactual world on its maps. Created through :class:`RayCollector`."""

    def __init__(self, checkpoint: dict, cfg, index: int, count: int, device: str = "cpu",
                 compile_proxy: bool = False):
        torch.set_num_threads(1)
        from craft.finetune.collector import Collector
        from craft.finetune.proxy import CounterfactualWorld
        from craft.policies.base import policy_from_checkpoint

        self.policy = policy_from_checkpoint(checkpoint, device=device)
        # every worker drives ``worlds`` routes at once and collects its share of the buffer: a world step
        # costs nearly the same for 64 routes as for 128 (per-step overhead), so halving the steps, not the
        # routes, is what makes n workers faster
        col = dataclasses.replace(cfg.collector, buffer_size=_share(cfg.collector.buffer_size, index, count))
        self.collector = Collector(col, device=device, shard=(index, count))
        self.proxy = CounterfactualWorld(self.collector.world.maps, cfg.proxy, compile=compile_proxy)
        self.index = index

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "host": socket.gethostname(), "index": self.index,
                "node": ray.get_runtime_context().get_node_id()}

    def load_state(self, state: dict) -> None:
        self.collector.load_state_dict(state)

    def collect(self, weights: dict, score: bool) -> dict:
        """Load pi_old's ``weights``, collect this worker's share of the buffer and (``score``) score it.
        Returns the lean buffer, the scores, timings and the collector state after the collection."""
        from craft.finetune.collector import Buffer
        from craft.policies.base import CandidateSet
        from craft.world.tracker import TrackerState

        self.policy.load_state_dict(weights)
        t0 = time.time()
        buf: Buffer = self.collector.collect(self.policy)
        t1 = time.time()
        scores = None
        if score:
            trk = TrackerState(buf.tracker["integral"], buf.tracker["prev_error"], buf.tracker["has_prev"])
            scores = self.proxy.score(buf.snapshot, buf.candidates.trajectories, buf.candidates.valid, trk)
            scores = dataclasses.replace(scores, advantages=None, diagnostics={})  # the driver normalises
        t2 = time.time()
        c = buf.candidates
        lean = dataclasses.replace(buf, snapshot=None, tracker=None, candidates=CandidateSet(
            c.trajectories.new_empty(c.trajectories.shape[0], c.trajectories.shape[1], 0, 3), c.valid, c.logits))
        lean = _to(lean)
        return {"buffer": lean, "scores": _to(scores), "t_collect": t1 - t0, "t_score": t2 - t1,
                "state": self.collector.state_dict()}


def _to(x, device="cpu"):
    """Tensors of a (nested) dataclass / dict / list on ``device`` (the CPU: what crosses between Ray
    processes; the driver's device: what its update reads)."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _to(getattr(x, f.name), device) for f in dataclasses.fields(x)
                                         if f.init})
    return x


# ---------------------------------------------------------------------- merging
def merge_buffers(parts: list):
    """Stack the workers' buffers along the decision axis (see the module docstring); worker order.

    Every ``(T_i, W_i, ...)`` tensor field is padded to ``W = max W_i`` (non-live, zeros) and concatenated
    over ``T``; every ``events`` field ``(T_i, k, W_i)`` likewise; the per-transition rows (observations,
    candidate sets) are concatenated, which keeps the (t, w) row order of the merged buffer."""
    from craft.finetune.collector import Buffer
    from craft.policies.base import CandidateSet
    from craft.world.observe import Observation

    if len(parts) == 1:
        return parts[0]
    W = max(p.live.shape[1] for p in parts)

    def pad_w(x: Tensor, dim: int) -> Tensor:
        if x.shape[dim] == W:
            return x
        shape = list(x.shape)
        shape[dim] = W - x.shape[dim]
        return torch.cat([x, x.new_zeros(shape)], dim)

    out = {}
    for f in dataclasses.fields(Buffer):
        vals = [getattr(p, f.name) for p in parts]
        v0 = vals[0]
        if f.name == "obs":
            out[f.name] = Observation.cat(vals)
        elif f.name == "candidates":
            out[f.name] = CandidateSet(torch.cat([c.trajectories for c in vals]), torch.cat([c.valid for c in vals]),
                                       torch.cat([c.logits for c in vals]))
        elif f.name == "events":
            out[f.name] = {k: torch.cat([pad_w(p[k], 2) for p in vals]) for k in v0}
        elif f.name == "info":
            out[f.name] = {k: sum(p[k] for p in vals) if isinstance(v0[k], (int, float)) else v0[k] for k in v0}
        elif isinstance(v0, Tensor) and v0.dim() >= 2 and tuple(v0.shape[:2]) == tuple(parts[0].live.shape):
            out[f.name] = torch.cat([pad_w(v, 1) for v in vals])
        elif v0 is None or f.name in ("snapshot", "tracker"):
            out[f.name] = None
        else:
            raise CraftError(f"merge_buffers: do not know how to merge Buffer.{f.name}")
    return Buffer(**out)


def merge_scores(parts: list, valid: Tensor, std_floor: float):
    """Concatenate the workers' proxy scores (rows in buffer order) and group-normalise them as the
    in-process proxy does (the normalisation is per state, so this equals scoring all states at once)."""
    from craft.finetune.proxy import CandidateScores
    from craft.finetune.rewards import group_normalise

    returns = torch.cat([p.returns for p in parts])
    terms = {k: torch.cat([p.terms[k] for p in parts]) for k in parts[0].terms}
    collided = torch.cat([p.collided for p in parts])
    adv, diag = group_normalise(returns, valid, std_floor)
    diag["collided_share"] = (collided & valid).sum() / valid.sum().clamp_min(1)
    return CandidateScores(returns=returns, advantages=adv, terms=terms, collided=collided, diagnostics=diag)


# ---------------------------------------------------------------------- the driver's side
class RayCollector:
    """Stands in for the trainer's collector: ``collect_and_score(policy, score)`` on ``workers`` Ray actors,
    ``state_dict`` / ``load_state_dict`` for checkpoints, ``close``. See the module docstring.

    policy: the driver's policy (its checkpoint dict builds each worker's copy); cfg: the
    :class:`~craft.finetune.trainer.FinetuneConfig`; address: None (a local Ray with at least ``workers``
    CPUs), ``auto`` or ``HOST:PORT``; max_restarts: per worker, over the run; restart_timeout: seconds to wait
    for a restarted worker before the run stops with an error.
    """

    def __init__(self, policy, cfg, workers: int, device: str = "cpu", address: str | None = None,
                 max_restarts: int = 3, restart_timeout: float = 300.0, compile_proxy: bool = False):
        import ray

        if workers < 1:
            raise CraftError(f"--workers must be >= 1, got {workers}")
        t0 = time.time()
        self.cfg = cfg
        self.n = workers
        self.restart_timeout = restart_timeout
        self.device = device
        self.started_ray = init_ray(address, workers)
        try:
            self._ck = ray.put(policy.checkpoint())  # kept alive: a restarted actor is rebuilt from it
            actor = ray.remote(num_cpus=1, max_restarts=max_restarts, max_task_retries=0,
                               **gpu_options(device, workers))(CollectWorker)
            self.workers = [actor.remote(self._ck, cfg, i, workers, device, compile_proxy) for i in range(workers)]
            try:
                self.info = self._get([w.ready.remote() for w in self.workers], "start")
            except ray.exceptions.RayActorError as e:  # the constructor raised: say why in one line
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                raise CraftError(f"a Ray worker failed to start: {lines[-1] if lines else type(e).__name__}") from None
        except BaseException:
            self.close()
            raise
        self.states: list[dict | None] = [None] * workers
        self.restarts = 0
        self.fault_hook: Callable[["RayCollector"], None] | None = None
        """Called right after an iteration's work was sent to the workers (fault-injection tests)."""
        self.startup_s = time.time() - t0

    _get = staticmethod(ray_get)

    def _recover(self, i: int) -> None:
        """Wait for worker ``i``'s restart and give it back its collector state of the last iteration."""
        import ray

        self.restarts += 1
        deadline = time.time() + self.restart_timeout
        while True:  # calls fail while Ray restarts the actor (no task retries): ask until it answers
            try:
                self.info[i] = ray.get(self.workers[i].ready.remote())
                if self.states[i] is not None:
                    ray.get(self.workers[i].load_state.remote(self.states[i]))
                return
            except ray.exceptions.RayActorError:
                if time.time() > deadline:
                    raise CraftError(f"Ray worker {i} died and was not restarted within {self.restart_timeout:.0f} s "
                                     "(max_restarts reached, or no CPU free for it)") from None
                time.sleep(0.5)

    def collect_and_score(self, policy, score: bool):
        """One iteration's buffer from every worker (see :meth:`Trainer.collect_and_score`)."""
        import ray

        t0 = time.time()
        weights = ray.put({k: v.detach().cpu() for k, v in policy.state_dict().items()})
        lost_total = 0
        while True:
            refs = [w.collect.remote(weights, score) for w in self.workers]
            if self.fault_hook is not None:
                self.fault_hook(self)
            results, lost = [], []
            for i, r in enumerate(refs):
                try:
                    results.append(self._get(r, "collection"))
                except ray.exceptions.RayActorError:  # the actor died: drop its partial data
                    results.append(None)
                    lost.append(i)
            for i in lost:
                self._recover(i)
            lost_total += len(lost)
            if any(r is not None for r in results):
                break  # the others' data completes the iteration; if every worker died, collect again
        ok = [r for r in results if r is not None]
        for i, r in enumerate(results):
            if r is not None:
                self.states[i] = r["state"]
        t1 = time.time()
        buf = _to(merge_buffers([r["buffer"] for r in ok]), self.device)
        scores = None
        if score:
            scores = merge_scores([_to(r["scores"], self.device) for r in ok], buf.candidates.valid,
                                  self.cfg.proxy.reward.group_std_floor)
        wall = time.time() - t0
        t_col = max(r["t_collect"] for r in ok)
        times = {"t_collect": t_col, "t_score": wall - t_col,
                 "workers/n": float(self.n), "workers/restarts": float(self.restarts), "workers/lost": float(lost_total),
                 "workers/t_collect_max": t_col, "workers/t_score_max": max(r["t_score"] for r in ok),
                 "workers/t_overhead": wall - max(r["t_collect"] + r["t_score"] for r in ok),
                 "workers/t_merge": time.time() - t1}
        return buf, scores, times

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Every worker's collector state after the last completed iteration (driver-side copies)."""
        return {"workers": self.n, "shards": list(self.states)}

    def load_state_dict(self, d: dict) -> None:
        if not isinstance(d, dict) or d.get("workers") != self.n:
            got = d.get("workers", 1) if isinstance(d, dict) else "?"
            raise CraftError(f"--resume: the run was collected with --workers {got}; resume it with the same "
                             f"--workers (got {self.n})")
        self.states = list(d["shards"])
        self._get([w.load_state.remote(s) for w, s in zip(self.workers, self.states) if s is not None], "resume")

    def close(self) -> None:
        """Stop the actors (and the local Ray instance if this object started it)."""
        try:
            import ray
        except ImportError:  # pragma: no cover
            return
        for w in getattr(self, "workers", []):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers = []
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        self.started_ray = False


__all__ = ["RayCollector", "CollectWorker", "merge_buffers", "merge_scores"]
