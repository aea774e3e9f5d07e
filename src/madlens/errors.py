"""The one exception type for bad input: the CLI prints its message as a single line.

A leaf module that every part of madlens may import (it imports nothing itself).
"""


class MadlensError(Exception):
    """A user-facing error: wrong argument, missing or malformed file, unknown model/hook."""
