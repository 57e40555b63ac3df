"""The one error type users see: a message that names the problem and the fix."""

import errno


class StarfishError(Exception):
    """Bad input or a failed check. The CLI prints it on one line and exits non-zero.

    Deterministic: retrying the same call with the same input fails the same way, so the
    pipeline never retries it.
    """


# Write failures a user fixes outside the program (room, permissions, a read-only mount).
_STORAGE_ERRNOS = {errno.ENOSPC: "free space there or write elsewhere",
                   errno.EDQUOT: "free space there or write elsewhere",
                   errno.EROFS: "write to a writable folder", errno.EACCES: "write to a folder you may write"}


def error_line(exc: BaseException) -> str | None:
    """The one line the command lines print instead of a traceback (then exit 2): a StarfishError's
    message, or a write that failed for want of room or permission; None for anything else."""
    if isinstance(exc, StarfishError):
        return f"starfish: error: {exc}"
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return f"starfish: error: cannot write{where}: {exc.strerror}; {_STORAGE_ERRNOS[exc.errno]}"
    return None
