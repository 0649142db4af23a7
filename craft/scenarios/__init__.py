"""Bench2Drive-style scenarios on CRAFT's world: placement (:mod:`.base`), types (:mod:`.library`),
batched scripts (:mod:`.script`) and benchmark splits (:mod:`.splits`)."""

from craft.scenarios.base import SCENARIOS, ScenarioInstance, build_scenario, implemented_types, start
from craft.scenarios.script import Action, Rule, ScriptTable, Trigger, apply, pack

__all__ = ["SCENARIOS", "ScenarioInstance", "build_scenario", "implemented_types", "start", "Action", "Rule",
           "ScriptTable", "Trigger", "apply", "pack"]
