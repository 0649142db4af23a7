"""GRPO: group-normalised counterfactual proxy only (CRAFT's L_cp without the grounded residual)."""

from craft.finetune.methods.craft import Grpo

__all__ = ["Grpo"]
