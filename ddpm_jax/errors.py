"""The one exception type for mistakes a user can fix, and how an error of the file system
(disk full, no permission) is told apart from a bug."""

import re

# TensorStore (orbax's array writer) reports an OS error as a ValueError carrying its code.
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='?\d+'?\]")


class UserError(ValueError):
    """A setting, path or missing dataset the user can fix. Its message names the problem
    and the fix; the entry points print it as one line, without a traceback."""


def file_system_error(error):
    """One line for an error of the file system, naming the path: an OSError, or
    TensorStore's ValueError with an OS error code. None for any other error."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    if isinstance(error, ValueError) and _TENSORSTORE_OS_ERROR.search(str(error)):
        return str(error).strip().splitlines()[0]
    return None
