"""Errors that carry enough context for a user to find the bad input, and the readers that
raise them for a file."""

from __future__ import annotations

from pathlib import Path


class IprError(Exception):
    """Base class for errors the CLI reports as a one-line message and exit code 2."""


class InputError(IprError):
    """Bad user input: names the source (file or config), the record and the field."""

    def __init__(
        self, source: str, message: str, record: str | None = None, field: str | None = None
    ):
        self.source, self.record, self.field = source, record, field
        where = source
        if record is not None:
            where += f", record {record!r}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


class UnknownEnvError(IprError):
    """An env id that no adapter is registered for."""


class SplitTooSmall(IprError):
    """A setting asks for more distinct games than a split of its env has."""


class EnvParamError(UnknownEnvError):
    """An env id whose game parameters are unknown, malformed or out of range."""


def raised_by_interrupt(exc: BaseException) -> bool:
    """Whether `exc` came up while a Ctrl-C was being handled (a library's clean-up failing
    on the way out): such an error is the interruption, not a failure of the stage."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def read_text(path: Path, max_bytes: int) -> str:
    """A UTF-8 text file (a BOM allowed) of at most `max_bytes`; errors name the file."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InputError(source, f"{size} bytes, over the {max_bytes}-byte cap for one file")
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(source, f"cannot read file: {exc.strerror}") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(
            source,
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} (save it as UTF-8)",
        ) from exc


def kind_of(value: object) -> str:
    """The JSON (and YAML) name of a value's type, for messages."""
    return _KIND_NAMES.get(type(value), type(value).__name__)


_KIND_NAMES: dict[type, str] = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    type(None): "null",
}
