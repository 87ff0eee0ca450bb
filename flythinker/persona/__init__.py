"""Persona and empathy conditioning: records, loaders, generator/reasoner views, the ``persona-empathy``
benchmark and its metrics."""

from pathlib import Path

from .empathy_dataset import TRAITS, compose_response, load_persona_empathy, make_persona_empathy
from .jsonio import JsonFileError, read_json_items
from .loaders import FORMATS, RecordError, detect_format, load_records, parse_records, save_records
from .metrics import classify_response, heldout_nll, mean_rouge_l, opens_with_validation, rouge_l, strategy_accuracy
from .records import Memory, Persona, PersonaRecord, Query, Turn
from .views import (
    DEFAULT_SYSTEM_PROMPT,
    FALLBACK_TEMPLATE,
    VIEWS,
    Views,
    build_views,
    generate_inputs,
    render_chat,
    resolve_view,
)

DATASETS = {"persona-empathy": load_persona_empathy}
HANDWRITTEN_USERS = Path(__file__).parent / "data" / "handwritten_users.jsonl"  # 48 users, docs/persona_empathy_v2.md


def load_handwritten_users() -> list[PersonaRecord]:
    """The 48 hand-written test users (ordinary English, no generator template; 16 per trait, each query used once
    per trait value, so a trait-blind model's likelihood preference is exactly 50%)."""
    return load_records(HANDWRITTEN_USERS, format="flythinker")


def load_dataset(name: str, split: str = "train", **kwargs) -> list[PersonaRecord]:
    """A bundled data set by name (``"persona-empathy"``), one split, as records."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; bundled: {sorted(DATASETS)}")
    return DATASETS[name](split, **kwargs)


__all__ = [
    "DATASETS", "HANDWRITTEN_USERS", "load_handwritten_users",
    "DEFAULT_SYSTEM_PROMPT", "FALLBACK_TEMPLATE", "FORMATS", "TRAITS", "VIEWS", "JsonFileError", "Memory",
    "Persona", "PersonaRecord", "Query", "RecordError", "Turn", "Views", "build_views", "classify_response",
    "generate_inputs",
    "compose_response", "detect_format", "heldout_nll", "load_dataset", "load_persona_empathy", "load_records",
    "make_persona_empathy", "mean_rouge_l", "opens_with_validation", "parse_records", "read_json_items",
    "render_chat", "resolve_view", "rouge_l", "save_records", "strategy_accuracy",
]
