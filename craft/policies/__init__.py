"""Candidate-scoring driving policies: the interface, the shared scene encoder, three families, pre-training.

Families: ``vocab`` (vocabulary scoring, :mod:`craft.policies.vocab`), ``hier`` (hierarchical path x speed
modes, :mod:`craft.policies.hier`) and ``vla`` (language decision expert with LoRA, :mod:`craft.policies.vla`).
"""

from craft.policies.base import (CandidatePolicy, CandidateSet, build_policy, families, load_policy,
                                 read_checkpoint)

__all__ = ["CandidatePolicy", "CandidateSet", "build_policy", "families", "load_policy", "read_checkpoint"]
