"""Bench2Drive-style scenarios on CRAFT's world: placement (:mod:`.base`), types (:mod:`.library`),
batched scripts (:mod:`.script`) and benchmark splits (:mod:`.splits`). Importing the package registers the
types (any import of a ``craft.scenarios`` module imports the package first)."""

from craft.scenarios.base import SCENARIOS, ScenarioInstance, build_scenario, implemented_types, start
from craft.scenarios.script import Action, Rule, ScriptTable, Trigger, apply, pack
from craft.scenarios import library  # noqa: F401,E402  (registers the 44 types in base.SCENARIOS)

__all__ = ["SCENARIOS", "ScenarioInstance", "build_scenario", "implemented_types", "start", "Action", "Rule",
           "ScriptTable", "Trigger", "apply", "pack"]
