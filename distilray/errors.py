"""The one exception type for expected, user-facing failures.

The CLI prints its message and exits with status 2, without a traceback. Anything else is a bug and
keeps its traceback.
"""


class DistilrayError(Exception):
    """Bad input or environment: a missing file, an unknown name, a bad config key, a corrupt checkpoint."""
