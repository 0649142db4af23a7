"""The grounded residual on one collected buffer: the per-decision form (the paper's Eq. 46, zone charges off)
against this project's earlier per-step form (zone charges 2.0 / 0.5, every step of a decision summed).

``python benchmarks/residual_density.py --init checkpoints/vocab.pt --towns 20 --worlds 128 --buffer 2048``
prints, for each form, the share of live transitions with a non-zero residual advantage and the share of the
grounded penalty mass by term.
"""

from __future__ import annotations

import argparse
import time

import torch

from craft.finetune.collector import Collector, CollectorConfig
from craft.finetune.rewards import GROUNDED_TERMS, RewardConfig, grounded_step_reward, residual_advantage
from craft.finetune.trainer import FinetuneConfig, decision_rewards
from craft.policies import load_policy
from craft.scenarios.splits import split_town_seeds


def per_step_form(buf, reward: RewardConfig):
    """The earlier residual: grounded penalties of every executed step, summed per decision."""
    ev = buf.events
    T, k, W = ev["speed"].shape
    g, terms = grounded_step_reward({n: v.reshape(T * k * W) for n, v in ev.items()}, reward)
    return g.view(T, k, W).sum(1) * buf.live, {n: v.view(T, k, W).sum(1) * buf.live for n, v in terms.items()}


def report(name: str, g, terms, buf, reward: RewardConfig) -> None:
    a = residual_advantage(g, buf.notdone, reward)
    live = buf.live
    total = float(-g[live].sum())
    mass = {n: float(-terms[n][live].sum()) / total if total else 0.0 for n in GROUNDED_TERMS}
    print(f"{name}: A_gr non-zero on {float((a[live] < 0).float().mean()):.1%} of {int(live.sum())} transitions; "
          f"|A_gr| >= 0.05 on {float((a[live] <= -0.05).float().mean()):.1%}; "
          f"reward non-zero on {float((g[live] < 0).float().mean()):.1%}; mean A_gr {float(a[live].mean()):.3f}")
    print("   mass by term: " + ", ".join(f"{n} {v:.1%}" for n, v in mass.items() if v > 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", default="checkpoints/vocab.pt")
    ap.add_argument("--towns", type=int, default=20)
    ap.add_argument("--worlds", type=int, default=128)
    ap.add_argument("--buffer", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(a.init)
    t0 = time.time()
    col = Collector(CollectorConfig(worlds=a.worlds, buffer_size=a.buffer, seed=a.seed,
                                    town_seeds=tuple(split_town_seeds("train")[:a.towns])))
    buf = col.collect(policy)
    print(f"collected {buf.size} transitions in {time.time() - t0:.0f} s")
    old = RewardConfig(w_stop_zone=2.0, w_go_zone=0.5)
    report("per step, zones 2.0 / 0.5 (before)", *per_step_form(buf, old), buf, old)
    new = FinetuneConfig()
    g, _, counts = decision_rewards(buf, new)
    terms_mass = {n: counts[f"grounded_mass/{n}"] for n in GROUNDED_TERMS}
    a_new = residual_advantage(g, buf.notdone, new.reward)
    print(f"per decision, zones off (after): A_gr non-zero on {float((a_new[buf.live] < 0).float().mean()):.1%}; "
          f"|A_gr| >= 0.05 on {float((a_new[buf.live] <= -0.05).float().mean()):.1%}; "
          f"reward non-zero on {float((g[buf.live] < 0).float().mean()):.1%}; mean A_gr "
          f"{float(a_new[buf.live].mean()):.3f}")
    print("   mass by term: " + ", ".join(f"{n} {v:.1%}" for n, v in terms_mass.items() if v > 0))


if __name__ == "__main__":
    main()
