"""Errors that reach the user as one line, without a traceback."""


class UserError(Exception):
    """A problem the user can fix: bad option, missing file, unknown model.

    The message names the problem and the fix; the command line prints it on one
    line and exits non-zero.
    """


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""
