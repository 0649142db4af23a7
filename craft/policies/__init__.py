"""Candidate-scoring driving policies: the interface, the shared scene encoder, three families, pre-training.

Families: ``vocab`` (vocabulary scoring, :mod:`craft.policies.vocab`), ``hier`` (hierarchical path x speed
modes, :mod:`craft.policies.hier`) and ``vla`` (language decision expert with LoRA, :mod:`craft.policies.vla`).
Each family module registers itself in :mod:`craft.policies.base`'s registry. This package (imported before
any ``craft.policies`` module) imports the two light families and names ``vla`` (it loads a language-model
stack, seconds) to be imported when it is first needed; ``base`` itself never imports a family.
"""

from craft.policies.base import (CandidatePolicy, CandidateSet, build_policy, families, load_policy,
                                 read_checkpoint, register_family_module)
from craft.policies import hier, vocab  # noqa: F401  (register the families)

register_family_module("vla", "craft.policies.vla")

__all__ = ["CandidatePolicy", "CandidateSet", "build_policy", "families", "load_policy", "read_checkpoint"]
