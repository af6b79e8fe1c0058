"""The one exception type users see.

Anything the user can fix (a bad config value, a missing file, a prompt that does not fit)
is raised as `SLMError` with a one-line message naming the problem and the fix; the CLI
prints it without a traceback. Everything else is a bug and keeps its traceback.
"""

import sys


class SLMError(Exception):
    """A user-facing error whose message names the problem and how to fix it."""


def warn(message: str) -> None:
    """Tell the user about something left out or worked around, as one `warning:` line on
    stderr: Python's `warnings` would add a source line and file position that mean nothing
    to someone running `slm`."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
