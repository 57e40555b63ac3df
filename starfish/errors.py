"""The one error type users see: a message that names the problem and the fix."""

import errno
import typing
from typing import Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import ValidationError


class StarfishError(Exception):
    """Bad input or a failed check. The CLI prints it on one line and exits non-zero.

    Deterministic: retrying the same call with the same input fails the same way, so the
    pipeline never retries it.
    """


def require(ok: bool, message: str) -> None:
    """Raise StarfishError(`message`) unless `ok`."""
    if not ok:
        raise StarfishError(message)


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


_LIMITS = {Gt: (">", "gt"), Ge: (">=", "ge"), Lt: ("<", "lt"), Le: ("<=", "le")}


def validation_problem(name: str, cls: type, error: ValidationError) -> str:
    """pydantic's first error in the pydantic dataclass `cls` (config section `name`) as one line
    naming the field, its value and what it must be: `heal.steps=0 must be >= 1`."""
    unknown = sorted(str(e["loc"][0]) for e in error.errors() if e["type"] == "unexpected_keyword_argument")
    if unknown:
        return f"{name}: unknown field(s) {unknown}; known: {sorted(cls.__pydantic_fields__)}"
    first = error.errors()[0]
    field, value, kind = (first["loc"] or ("",))[0], first["input"], first["type"]
    if field not in cls.__pydantic_fields__:  # a positional argument too many, say
        return f"{name}: {first['msg']}"
    where, info = f"{name}.{field}", cls.__pydantic_fields__[field]
    base = next(t for t in typing.get_args(info.annotation) or (info.annotation,) if t is not type(None))
    if value is None:
        return f"{where} must not be empty"
    if kind == "literal_error":
        return f"{where}={value!r}: use one of {list(typing.get_args(info.annotation))}"
    if kind == "finite_number":
        return f"{where}={value!r} must be a finite number"
    if kind == "dict_type":
        return f"{where}={value!r} must be a mapping of names to values, e.g. {{img_size: 384}}"
    if kind in ("int_parsing", "float_parsing"):
        return f"{where}={value!r} must be a number ({base.__name__})"
    limits = [(op, getattr(m, attr)) for m in info.metadata for t, (op, attr) in _LIMITS.items() if isinstance(m, t)]
    if kind.startswith(("greater_than", "less_than")) and len(limits) == 2:  # declared low, then high
        (low_op, low), (high_op, high) = limits
        bounds = f"in {'(' if low_op == '>' else '['}{low}, {high}{')' if high_op == '<' else ']'}"
    elif kind.startswith(("greater_than", "less_than")):
        bounds = " ".join(map(str, limits[0]))
    else:
        return f"{where}={value!r} must be {({bool: 'true or false', str: 'text'}).get(base, base.__name__)}"
    return f"{where}={base(value)} must be {bounds}" + (f" ({info.description})" if info.description else "")


def one_line_errors(name: str, cls: type) -> type:
    """`cls`, a pydantic dataclass, with its validation errors raised as one StarfishError naming
    `name.field` (`validation_problem`), so direct construction keeps the CLI's error contract."""
    validate = cls.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            validate(self, *args, **kwargs)
        except ValidationError as error:
            raise StarfishError(validation_problem(name, cls, error)) from None
    cls.__init__ = __init__
    return cls
