"""The one base class for mistakes the user can fix (a config value, a path, a size).

The CLI and the job runner turn any ``UserError`` into ``error: <message>`` and exit code 2,
never a traceback. It lives in ``cluster/`` because every other package may import it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input or settings; its message says what to change."""


class ConfigError(UserError):
    """A config problem, already phrased for the user (one line per problem)."""
