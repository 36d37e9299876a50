"""Errors meant for the user: `main` turns them into one `error: ...` line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (a config key, a file, a flag); the message names the culprit."""


class ConfigError(UserError):
    """An invalid or inconsistent configuration value."""


class DataError(UserError):
    """A data file that is missing, empty or unreadable."""
