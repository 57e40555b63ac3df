"""The one error type users see: a message that names the problem and the fix."""


class StarfishError(Exception):
    """Bad input or a failed check. The CLI prints it on one line and exits non-zero.

    Deterministic: retrying the same call with the same input fails the same way, so the
    pipeline never retries it.
    """
