"""Lazy package attributes (PEP 562): a name is imported from its module on first use.

`curate.filters`, `curate.judges` and `curate.generators` export their public functions this way,
so `from curate.filters import ches_scores` works while `import curate.filters` loads nothing
heavy (no pyarrow, torch or vllm until a function is asked for).

Example: __getattr__, __dir__ = lazy_attributes(__name__, {"ches_scores": "ches"})
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_attributes(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: name -> submodule it lives in (relative to the package,
    or an absolute `curate.` module path for a name re-exported from outside it).

    A resolved name is stored on the package, so each is imported once.
    Example: lazy_attributes("curate.filters", {"ches_scores": "ches"})[0]("ches_scores")
    """

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        path = module if module.startswith("curate.") else f"{package}.{module}"
        value = getattr(importlib.import_module(path), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
