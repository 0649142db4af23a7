"""CARLA towns (OpenDRIVE) and public route files shipped with the package; provenance in README.md here.

:func:`carla_data` is the folder (use it as ``--maps``), :func:`route_file` a shipped route file by name.
"""

from __future__ import annotations

from pathlib import Path

from craft.errors import CraftError

ROUTE_FILES = ("longest6", "leaderboard1_routes_training", "leaderboard1_routes_testing",
               "leaderboard1_routes_devtest")
TOWNS = ("Town01", "Town02", "Town04", "Town06")


def carla_data() -> Path:
    """The folder holding ``Town01.xodr`` ... and the route files."""
    return Path(__file__).resolve().parent


def route_file(name: str) -> Path:
    """A shipped route file by name (``longest6``, ``leaderboard1_routes_testing``, ...)."""
    if name not in ROUTE_FILES:
        raise CraftError(f"no shipped route file '{name}'; shipped: {', '.join(ROUTE_FILES)}")
    return carla_data() / f"{name}.xml"
