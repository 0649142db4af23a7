"""Why are the pre-trained bases weak? Open-loop figures of a policy on demonstrations, split by what the expert
does (stand, creep, slow, cruise), and how well each family's candidate set covers those plans.

    python benchmarks/base_diagnosis.py --data DEMOS.pt [--policies checkpoints/vocab.pt ...] [--json OUT]

Per policy: accuracy (top-1 = the candidate nearest the expert), L2 of top-1 and of the nearest candidate at
3 s, entropy and top-1 probability of the scorer, each overall and per expert speed class (the distance the
expert's plan covers in 3 s: stand < 0.5 m, creep 0.5-4 m, slow 4-15 m, cruise >= 15 m). For fixed
candidate sets (vocab) also the number of vocabulary entries per class; ``same_class``: the top-1 candidate is
of the expert's class; ``mass``: the scorer's probability on candidates of the expert's class.
"""

from __future__ import annotations

import argparse
import json

import torch

from craft.policies import load_policy
from craft.policies.data import demo_batch, load_demos
from craft.policies.vocab import mean_l2

CLASSES = (("stand", 0.0, 0.5), ("creep", 0.5, 4.0), ("slow", 4.0, 15.0), ("cruise", 15.0, float("inf")))


def travel(traj: torch.Tensor) -> torch.Tensor:
    """(N,) distance from the ego to the last waypoint of ``traj (N, T, 3)``, m."""
    return traj[:, -1, :2].norm(dim=-1)


def class_of(d: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(d, dtype=torch.long)
    for i, (_, lo, hi) in enumerate(CLASSES):
        out[(d >= lo) & (d < hi)] = i
    return out


@torch.no_grad()
def diagnose(policy, data: dict, batch: int = 512) -> dict:
    n = len(data["expert"])
    cls = class_of(travel(data["expert"]))
    rows = {k: [] for k in ("acc", "l2", "oracle", "ent", "p1", "top_cls", "mass")}
    for part in torch.arange(n).split(batch):
        obs, expert = demo_batch(data, part)
        cs = policy(obs)
        top = cs.top1()
        dist = mean_l2(cs.trajectories, expert[:, None]).masked_fill(~cs.valid, float("inf"))
        best = dist.argmin(-1)
        end = (cs.trajectories[..., -1, :2] - expert[:, None, -1, :2]).norm(dim=-1)
        lp = cs.log_probs()
        p = lp.exp()
        rows["acc"].append((top == best).float())
        rows["l2"].append(end.gather(1, top[:, None]).squeeze(1))
        rows["oracle"].append(end.gather(1, best[:, None]).squeeze(1))
        rows["ent"].append(-(p * lp).masked_fill(~cs.valid, 0).sum(-1))
        rows["p1"].append(p.amax(-1))
        rows["top_cls"].append(class_of(travel(cs.select(top))))
        ccls = class_of(cs.trajectories[..., -1, :2].norm(dim=-1).flatten()).view(p.shape)
        rows["mass"].append((p * (ccls == class_of(travel(expert))[:, None])).sum(-1))
    r = {k: torch.cat(v) for k, v in rows.items()}
    out = {"all": {k: float(r[k].float().mean()) for k in ("acc", "l2", "oracle", "ent", "p1", "mass")} | {"n": n}}
    for i, (name, _, _) in enumerate(CLASSES):
        m = cls == i
        if m.any():
            out[name] = {k: float(r[k][m].float().mean()) for k in ("acc", "l2", "oracle", "ent", "p1", "mass")}
            out[name]["share"] = float(m.float().mean())
            # how often the policy's top-1 is of the same speed class as the expert's plan
            out[name]["same_class"] = float((r["top_cls"][m] == i).float().mean())
    if hasattr(policy, "vocabulary"):
        vc = class_of(travel(policy.vocabulary))
        out["vocabulary_entries"] = {name: int((vc == i).sum()) for i, (name, _, _) in enumerate(CLASSES)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--policies", nargs="+", default=["checkpoints/vocab.pt", "checkpoints/hier.pt",
                                                        "checkpoints/vla.pt"])
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = load_demos(a.data)
    res = {}
    for path in a.policies:
        res[path] = diagnose(load_policy(path), data)
        d = res[path]
        print(f"{path}: " + "  ".join(f"{c}: share {d[c]['share']:.2f} acc {d[c]['acc']:.2f} same-class "
                                     f"{d[c]['same_class']:.2f} L2@3s {d[c]['l2']:.2f} best {d[c]['oracle']:.2f} "
                                     f"H {d[c]['ent']:.2f} p1 {d[c]['p1']:.2f} class-mass {d[c]['mass']:.2f}"
                                     for c, _, _ in CLASSES if c in d))
        print(f"   all: {d['all']}" + (f"  vocabulary per class: {d['vocabulary_entries']}"
                                       if "vocabulary_entries" in d else ""))
    if a.json:
        from craft.files import write_json

        write_json(a.json, res)


if __name__ == "__main__":
    main()
