"""Errors that carry enough context for a user to find the bad input."""


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
