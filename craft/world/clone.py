"""Cloning stored world states into many independent copies (counterfactual rollouts in the *real* world).

A :class:`~craft.world.state.WorldState` is a dataclass of tensors with a leading world axis, so a copy of
every row ``n`` times is one ``index_select`` per field (:meth:`WorldState.index` with a repeated index).
Everything the closed-loop world needs to continue a world identically is inside the state: agents and
their behaviour parameters, lane queues, holds and speed overrides, forced lights, the route, the ego's
event bookkeeping and the per-world random-stream key (``seed``; the step's random numbers are counter-based,
so every copy draws the same numbers for the same agent and step). What a state does *not* hold: the
ego's tracker memory (tile it with :func:`tile_tracker`) and a scenario's script table
(:mod:`craft.scenarios.script`), which lives beside the state in the runner / collector.
"""

from __future__ import annotations

import torch

from craft.errors import CraftError
from craft.world.state import WorldState
from craft.world.tracker import TrackerState

__all__ = ["tile_index", "tile_state", "tile_tracker"]


def tile_index(batch: int, repeats: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch * repeats,) long: ``[0]*repeats + [1]*repeats + ...``: row ``b * repeats + g`` copies world ``b``."""
    if batch < 0 or repeats < 1:
        raise CraftError(f"tile_index: batch must be >= 0 and repeats >= 1, got {batch}, {repeats}")
    return torch.arange(batch, device=device).repeat_interleave(repeats)


def tile_state(state: WorldState, repeats: int) -> WorldState:
    """``repeats`` independent copies of every world, copies of one world adjacent.

    state: ``B`` worlds. Returns ``B * repeats`` worlds (new tensors; row ``b * repeats + g`` is world ``b``).
    """
    return state.index(tile_index(state.batch_size, repeats, state.device))


def tile_tracker(tracker: TrackerState, repeats: int) -> TrackerState:
    """The ego tracker memory ``(B,)`` tiled like :func:`tile_state` to ``(B * repeats,)``."""
    idx = tile_index(int(tracker.integral.shape[0]), repeats, tracker.integral.device)
    return TrackerState(tracker.integral[idx], tracker.prev_error[idx], tracker.prev_valid()[idx])
