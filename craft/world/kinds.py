"""Agent kinds and their default box sizes."""

from enum import IntEnum


class AgentKind(IntEnum):
    """What an agent is. The ego is agent 0 of every world and has kind EGO."""

    EGO = 0
    CAR = 1
    TRUCK = 2
    BICYCLE = 3
    EMERGENCY = 4  # emergency vehicle; its siren flag lives in the world state
    PEDESTRIAN = 5
    STATIC = 6  # parked cars, cones, accident debris: never move


VEHICLE_KINDS = (AgentKind.EGO, AgentKind.CAR, AgentKind.TRUCK, AgentKind.BICYCLE, AgentKind.EMERGENCY)

# (length, width, wheelbase) in metres per kind.
DEFAULT_SIZE = {
    AgentKind.EGO: (4.9, 2.1, 2.9),
    AgentKind.CAR: (4.6, 1.9, 2.8),
    AgentKind.TRUCK: (8.5, 2.5, 5.0),
    AgentKind.BICYCLE: (1.8, 0.7, 1.1),
    AgentKind.EMERGENCY: (5.4, 2.1, 3.2),
    AgentKind.PEDESTRIAN: (0.6, 0.6, 0.5),
    AgentKind.STATIC: (4.5, 1.9, 2.8),
}

# (length, width) of the static objects scenarios place (kind STATIC; the size tells them apart).
STATIC_SIZES = {
    "parked_car": (4.5, 1.9),
    "cone": (0.4, 0.4),
    "traffic_warning": (0.8, 1.2),  # warning sign / barrier
    "debris": (1.6, 1.2),  # accident debris
}
