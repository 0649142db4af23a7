"""Fine-tuning methods, one small module each: ``craft``, ``grpo``, ``ppo``, ``reinforcepp``."""

from craft.errors import CraftError
from craft.finetune.methods.base import FineTuneMethod, IterationData

METHODS = ("craft", "grpo", "ppo", "reinforcepp")


def make_method(name: str, cfg, feature_dim: int) -> FineTuneMethod:
    from craft.finetune.methods.craft import Craft, Grpo
    from craft.finetune.methods.ppo import Ppo
    from craft.finetune.methods.reinforcepp import ReinforcePP

    if name == "craft":
        return Craft(cfg)
    if name == "grpo":
        return Grpo(cfg)
    if name == "ppo":
        return Ppo(cfg, feature_dim)
    if name == "reinforcepp":
        return ReinforcePP(cfg)
    raise CraftError(f"unknown fine-tuning method '{name}' (one of {', '.join(METHODS)})")


__all__ = ["METHODS", "make_method", "FineTuneMethod", "IterationData"]
