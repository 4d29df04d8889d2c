"""Exceptions shown to users as clear messages (the CLI prints them without a traceback)."""


class SpikingBrainError(ValueError):
    """Bad input from the user: a config, a recipe, a path, a tensor of the wrong shape."""
