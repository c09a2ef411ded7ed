"""The README's configuration table, rendered from `SconesConfig`'s fields: key, default, meaning."""

import json
from dataclasses import fields
from typing import Any

from stacks.config import ALGORITHMS, ENVIRONMENTS, SconesConfig, context_key


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):
        return f"`{','.join(value)}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _default_shown(setting) -> str:
    """The default as the table shows it; a derived one for each choice of the field it varies with."""
    default = SconesConfig()
    basis = setting.metadata["varies_with"]
    if basis is None:
        return _shown(getattr(default, setting.name))
    choices = {"env_name": ENVIRONMENTS, "training_algorithm": ALGORITHMS}[basis]
    others = [
        f"`{choice}`: {_shown(getattr(SconesConfig(**{basis: choice}), setting.name))}"
        for choice in choices
        if choice != getattr(default, basis)
    ]
    return f"{_shown(getattr(default, setting.name))} ({'; '.join(others)})"


def config_table() -> str:
    """The configuration as a Markdown table: key | default | meaning, one row per context key."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [
        f"| `{context_key(setting)}` | {_default_shown(setting)} | {setting.metadata['meaning']} |"
        for setting in fields(SconesConfig)
    ]
    return "\n".join(rows) + "\n"
