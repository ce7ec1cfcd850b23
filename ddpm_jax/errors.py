"""The one exception type for mistakes a user can fix."""


class UserError(ValueError):
    """A setting, path or missing dataset the user can fix. Its message names the problem
    and the fix; the entry points print it as one line, without a traceback."""
