"""The one exception type for mistakes a user can fix (config, data, workdir)."""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and the fix.

    `research.main` prints these without a traceback and exits with status 2.
    """
