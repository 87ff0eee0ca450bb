"""The one reader of JSON data files: every data path (``persona.load_records``, ``flythinker train``'s
``training.data.load_examples``, the bundled data set's cache) goes through :func:`read_json_items`.

Accepted: a JSON list of items, a single JSON value (pretty-printed or not; one item), or JSON lines (one value per
non-blank line). Errors are :class:`JsonFileError` (a ``ValueError``) naming the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class JsonFileError(ValueError):
    """A data file that is not JSON / JSON lines; the message names the file and the line."""


def read_json_items(path: str | os.PathLike) -> list[Any]:
    """The items of a JSON list, a single JSON document (-> one item) or a JSON-lines file; ``[]`` if blank.

    Which of the three is decided by parsing: the whole text as one document first, then line by line. A broken
    file is reported the way it was meant: as JSON lines (``line N is not valid JSON``) when its first line is a
    complete JSON value on its own, else as one document (the line and column where parsing stopped).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JsonFileError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise JsonFileError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as doc_error:
        return _json_lines(path, text, doc_error)
    except RecursionError:
        raise JsonFileError(_too_deep(path)) from None
    return data if isinstance(data, list) else [data]


def _too_deep(path: Path, line: int | None = None) -> str:
    where = f" (line {line})" if line is not None else ""
    return f"{path}: JSON nested too deeply to read{where}: no record is nested that deep"


def _json_lines(path: Path, text: str, doc_error: json.JSONDecodeError) -> list[Any]:
    items, first = [], True
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except RecursionError:
            raise JsonFileError(_too_deep(path, n)) from None
        except json.JSONDecodeError as e:
            if first:  # not even one value on the first line: a (broken) multi-line JSON document
                raise JsonFileError(f"{path}: not valid JSON (line {doc_error.lineno}, column {doc_error.colno}): "
                                    f"{doc_error.msg}") from None
            raise JsonFileError(f"{path}: line {n} is not valid JSON (neither one JSON document nor JSON lines): "
                                f"{e.msg} (column {e.colno})") from None
        first = False
    return items
