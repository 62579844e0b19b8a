"""The one exception type for mistakes a user can fix (config, data, workdir),
and the way out of a process whose main thread may be stuck."""
import os


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and the fix.

    `research.main` prints these without a traceback and exits with status 2.
    """


def exit_now(message: str, status: int) -> None:
    """Ends the process at once from any thread (the main one may be hung in
    a step or in JAX's start-up): one "error:" line on stderr, no cleanup."""
    os.write(2, f"error: {message}\n".encode())
    os._exit(status)  # pylint: disable=protected-access
