"""Building blocks shared by every configuration section."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


def fix_hint(hint: str) -> dict[str, Any]:
    """Attach an operator-facing hint to a field (read by the error formatter)."""
    return {"fix": hint}


def rule_error(key: str, message: str, fix: str) -> PydanticCustomError:
    """Build a cross-field validation error that still names a precise key.

    Model validators only know the section they run in; the ``key`` and ``fix``
    in the context let the formatter point at e.g. ``rtp.port_min``.
    """
    ctx = {"message": message, "key": key, "fix": fix}
    return PydanticCustomError("pbx_rule", "{message}", ctx)


class Section(BaseModel):
    """Base for all sections: unknown keys are errors, assignments re-validate."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
