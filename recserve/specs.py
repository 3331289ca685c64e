"""Reading what users write (YAML/JSON specs) into pydantic models, with one kind of error message:
``<source>: <field.path>: <problem>``, raised as ConfigError (one line on the CLI, no traceback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from recserve.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_text(path: Path, what: str, hint: str = "") -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}{'; ' + hint if hint else ''}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not a YAML text file{'; ' + hint if hint else ''}") from e


def read_mapping(text: str, source: str, what: str) -> dict[str, Any]:
    """YAML (or JSON) text that must be a mapping; empty text is an empty mapping."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML ({str(e).splitlines()[0]})") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {what}")
    return raw


def validate(model: type[M], raw: Any, source: str) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or source}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from e


def parse_staged(model: type[M], text: str, source: str, what: str, stage_types: tuple[str, ...],
                 unknown: str = "unknown stage type {kind!r}") -> M:
    """A recipe (``model``) from YAML ``text``: a mapping whose ``stages`` each name a ``type`` among
    ``stage_types``. A stage of another type gets one error naming it (``unknown`` says how) and the types there
    are, before pydantic's own message (which would list every field of every stage type) could."""
    raw = read_mapping(text, source, what)
    if not raw:
        raise ConfigError(f"{source}: {what}")
    stages = raw.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        kind = stage.get("type") if isinstance(stage, dict) else None
        if kind not in stage_types:
            raise ConfigError(f"{source}: stages.{i}: {unknown.format(kind=kind)}; use one of {', '.join(stage_types)}")
    return validate(model, raw, source)
