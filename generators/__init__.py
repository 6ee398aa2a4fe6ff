"""Generators: stages that write N candidate responses per prompt (`generators.responses`), and RSO's
rejection sampling over scored candidates (`pairs.rso`, METHODS §8.4).

Each name is imported on first use, so `import curate.generators` stays cheap.

Example: from curate.generators import Responses, ResponsesParams
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from curate.lazy import lazy_attributes

_EXPORTS = {
    **dict.fromkeys(["Responses", "ResponsesParams", "with_system"], "responses"),
    # RSO rejection sampling, METHODS §8.4
    **dict.fromkeys(["acceptance_probabilities", "rso_accept", "rso_sample", "RSOPairs", "RSOParams"], "rso"),
}

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name loads on first use
    from curate.generators.responses import Responses, ResponsesParams, with_system
    from curate.generators.rso import RSOPairs, RSOParams, acceptance_probabilities, rso_accept, rso_sample
