"""The project's one exception type for bad input."""


class CraftError(Exception):
    """Bad input (config, checkpoint, map, scenario, CLI argument).

    The message says what was wrong and how to fix it; the CLI prints it on one line and exits non-zero.
    """
