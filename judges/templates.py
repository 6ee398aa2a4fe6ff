"""Judge prompt templates: text files whose content is hashed into the judge's stage key.

A template is plain text with `{name}` fields (Python `str.format`); the built-in ones live in
`curate/judges/templates/*.txt`, and a pipeline may name its own file instead. Leaves out:
chat formatting (the backend applies the judge model's chat template).

Example: load_template("self_reward").render(prompt="User: hi", response="Hello!")
"""
from __future__ import annotations

import os
import string
from dataclasses import dataclass
from typing import Any

from curate.errors import ConfigError
from curate.keys import digest

BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "templates")


@dataclass(frozen=True)
class Template:
    """A template's text, its fields and the hash that enters stage keys.

    Example: load_template("self_reward").fields -> ('prompt', 'response')
    """

    name: str
    text: str

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.text) if f)

    @property
    def hash(self) -> str:
        return digest(self.text)

    def render(self, **values: str) -> str:
        """Fill the fields. Example: template.render(prompt="User: hi", response="Hello")"""
        return self.text.format(**values)


def load_template(name_or_path: str, required: tuple[str, ...] = ()) -> Template:
    """A built-in template by name, or a template file by path; checks the required fields.

    Example: load_template("judges/my_judge.txt", required=("prompt", "response"))
    """
    path = name_or_path if os.path.sep in name_or_path or name_or_path.endswith(".txt") else \
        os.path.join(BUILTIN_DIR, f"{name_or_path}.txt")
    try:
        with open(path, encoding="utf-8") as f:
            template = Template(name_or_path, f.read())
    except (FileNotFoundError, IsADirectoryError, ValueError, OSError) as exc:  # ValueError: a NUL in the name
        builtin = sorted(n[:-4] for n in os.listdir(BUILTIN_DIR) if n.endswith(".txt"))
        why = "no such template" if isinstance(exc, FileNotFoundError) else f"cannot read the template ({type(exc).__name__})"
        raise ConfigError(f"{why} (built-in: {', '.join(builtin)})", where=repr(name_or_path)[1:-1]) from None
    try:
        missing = [f for f in required if f not in template.fields]
    except ValueError as exc:
        raise ConfigError(f"template is not a valid format string: {exc}", where=path) from None
    if missing:
        raise ConfigError(f"template lacks the fields {missing}", where=path)
    return template


def read_yaml(path: str, missing: str, where: str) -> Any:
    """A YAML file's data (safe_load; None when empty); a ConfigError naming the file when it is
    missing (`missing` at `where`) or not valid YAML.

    Example: read_yaml(f"{BUILTIN_DIR}/cdr_customization.yaml", "no such file", "cdr")["criteria"]
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(missing, where=where) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where=path) from None


def conversation_text(messages: list[dict[str, str]]) -> str:
    """A conversation as 'User: ... / Assistant: ...' lines for a judge prompt.

    Example: conversation_text([{"role": "user", "content": "hi"}]) -> 'User: hi'
    """
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)
