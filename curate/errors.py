"""The errors curate raises on purpose: each names where the problem is (file, line, row, stage).

The CLI prints these as one short line and exits non-zero; anything else is a bug and keeps its
traceback. Leaves out: recovery (the runner keeps finished parts; re-running resumes).

Example: raise ConfigError("unknown stage 'filters.lenght'", where="p.yaml:7", hint="filters.length")
"""
from __future__ import annotations


class CurateError(Exception):
    """Base of every error meant for the user, with an optional location and hint.

    Example: str(CurateError("bad", where="a.yaml:3")) -> 'a.yaml:3: bad'
    """

    exit_code = 1

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __reduce__(self):  # keep `where` and `hint` when a Dask worker sends the error back
        return (_rebuild, (type(self), self.message, self.where, self.hint))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" (did you mean '{self.hint}'?)"
        return text


def _rebuild(cls: type, message: str, where: str | None, hint: str | None) -> CurateError:
    return cls(message, where=where, hint=hint)


class ConfigError(CurateError):
    """A pipeline file that cannot be read or validated.

    Example: ConfigError("unknown key 'sorce'", where="p.yaml:2", hint="source")
    """

    exit_code = 2


class SchemaError(CurateError):
    """A column a stage needs is missing or has the wrong type.

    Example: SchemaError("needs column 'chosen' (string)", where="stage 'length'")
    """

    exit_code = 2


class InputError(CurateError):
    """Source data that cannot be ingested: unreadable file, bad line, null prompt, no rows.

    Example: InputError("line is not valid UTF-8", where="prompts.jsonl:12")
    """

    exit_code = 3


class StageError(CurateError):
    """A stage failed on a whole part; the part is not committed and the run can be resumed.

    Example: StageError("produced column 'x' it did not declare", where="stage 'pairs' part 3")
    """

    exit_code = 4
