"""The one exception type quiver raises for bad input.

The CLI turns a `QuiverError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class QuiverError(Exception):
    """Bad input or state that the user can fix: unknown task, corrupt file, mismatched expert."""
