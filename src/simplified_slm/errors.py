"""The one exception type users see.

Anything the user can fix (a bad config value, a missing file, a prompt that does not fit)
is raised as `SLMError` with a one-line message naming the problem and the fix; the CLI
prints it without a traceback. Everything else is a bug and keeps its traceback.
"""


class SLMError(Exception):
    """A user-facing error whose message names the problem and how to fix it."""
