"""The package-wide user-facing errors (one clear line each; no traceback shown).

Entry points catch both, print `error: <message>` and exit with
`exit_codes.USAGE`. This module imports nothing, so any module may raise them.
"""


class ConfigError(ValueError):
    """A user-facing configuration error: one line naming the cause and the fix."""


class UserError(RuntimeError):
    """Bad user input outside the config (files, data, checkpoints): one clear line."""
