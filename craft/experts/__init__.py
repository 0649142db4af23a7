"""Privileged experts that drive the CRAFT world (rule-based planners with access to the full state)."""

from craft.experts.pdm import ExpertConfig, ExpertDebug, PrivilegedExpert

__all__ = ["ExpertConfig", "ExpertDebug", "PrivilegedExpert"]
