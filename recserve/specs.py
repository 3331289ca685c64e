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
