"""The one exception type for mistakes a user can fix.

The CLI catches :class:`UserError` and prints its message on one line, so every
message must name the problem *and* the fix. Anything else that escapes is a bug
in jaxllm and keeps its traceback.
"""


class UserError(Exception):
    """A user-fixable problem (bad config, missing file, mesh mismatch, ...)."""
