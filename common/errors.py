"""The one exception type that the command line reports as a one-line message, without a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad option, missing model, malformed facts file).

    The message says what is wrong and what to do; `main.py` prints it and exits with status 1.
    """
