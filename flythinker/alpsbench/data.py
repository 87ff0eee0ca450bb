"""AlpsBench data: the annotation packets and the public release's ``model_input.jsonl`` rows.

Annotation packets (github MissHsiaoo/AlpsBench_task1_3_annotation_data_repo, ODC-BY): one JSON file per
session, ``chunks/chunk_NNNN/sess_<id>.json``, holding the dialogue and Task 1 (gold memories plus the paper's
7 models' parsed outputs under ``llm_outputs``), Task 2 (new dialogue, memory pool before the update, gold state
after), Task 3 (query, 101 candidate memories, the selected memory) and Task 4 (per-ability queries with the
selected memory). :func:`load_packet` reads one, :func:`iter_packets` a folder.

Public release rows (github ThisIsCosine/AlpsBench ``benchmark_data/<split>/<track>/model_input.jsonl``):
``{"benchmark_id", "task", "input": {...}}`` per row; :func:`read_jsonl` reads them and :func:`release_rows`
builds the same rows (and their ``reference_output`` rows) from packets, so the harness can run on data built
here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flythinker.memory.schema import MemoryItem, items_from_list


class AlpsBenchDataError(ValueError):
    """A packet or row that does not have the AlpsBench shape; the message names the file and field."""


@dataclass
class Turn:
    role: str
    text: str


@dataclass
class Task2Item:
    """Memory update: the pool before, the new dialogue, the gold pool after."""

    new_dialogue: list[Turn]
    pool_before: list[MemoryItem]
    gold_after: list[MemoryItem]
    selected_memory_id: str | None = None


@dataclass
class Task3Item:
    """Retrieval: a query, candidate memories (``memory_id``, ``value``, ``label``; ids may repeat across users),
    and the gold memory's id and value."""

    query: str
    candidates: list[dict[str, Any]]
    gold_id: str
    gold_value: str


@dataclass
class Task4Item:
    """Utilisation: one ability's queries and the memory they need."""

    ability: str
    queries: list[dict[str, str]]
    memory_id: str | None
    memory_value: str


@dataclass
class Packet:
    """One annotated session."""

    session_id: str
    dialogue: list[Turn]
    task1_gold: list[MemoryItem] | None = None
    task1_outputs: dict[str, list[MemoryItem]] = field(default_factory=dict)
    task2: Task2Item | None = None
    task3: Task3Item | None = None
    task4: list[Task4Item] = field(default_factory=list)
    path: str = ""


def _turns(rows: Any, where: str) -> list[Turn]:
    if not isinstance(rows, list):
        raise AlpsBenchDataError(f"{where}: expected a list of turns, got {type(rows).__name__}")
    out = []
    for i, t in enumerate(rows):
        if not isinstance(t, dict) or "role" not in t:
            raise AlpsBenchDataError(f"{where}[{i}]: a turn needs 'role' and 'text'")
        out.append(Turn(str(t["role"]), str(t.get("text") or t.get("content") or "")))
    return out


def _task2(d: dict, where: str) -> Task2Item | None:
    if not d:
        return None
    return Task2Item(_turns(d.get("new_dialogue") or [], f"{where}.new_dialogue"),
                     items_from_list(d.get("memory_pool_before_update") or []),
                     items_from_list(d.get("golden_answer") or []), d.get("task2_selected_memory_id"))


def _task3(d: dict, where: str) -> Task3Item | None:
    if not d:
        return None
    sel = d.get("task3_selected_memory") or {}
    if not d.get("query") or not isinstance(d.get("candidate_memories"), list) or "value" not in sel:
        raise AlpsBenchDataError(f"{where}: task3 needs 'query', 'candidate_memories' and 'task3_selected_memory'")
    return Task3Item(str(d["query"]), list(d["candidate_memories"]),
                     str(d.get("task3_selected_memory_id") or sel.get("memory_id") or ""), str(sel["value"]))


def _task4(rows: list, where: str) -> list[Task4Item]:
    out = []
    for r in rows or []:
        sel = r.get("task4_selected_memory") or {}
        out.append(Task4Item(str(r.get("ability")), list(r.get("queries") or []),
                             r.get("task4_selected_memory_id") or sel.get("memory_id"), str(sel.get("value") or "")))
    return out


def packet_from_dict(d: Any, where: str = "packet") -> Packet:
    """A :class:`Packet` from one annotation-packet object (``where`` names it in errors)."""
    if not isinstance(d, dict) or "session_id" not in d:
        raise AlpsBenchDataError(f"{where}: not an AlpsBench annotation packet (no 'session_id')")
    try:
        t1 = d.get("task1") or {}
        outputs = {name: items_from_list(o.get("memory_items") or [], strict=False, id_prefix="p")
                   for name, o in (t1.get("llm_outputs") or {}).items()}
        gold = items_from_list(t1["ground_truth_memories"]) if "ground_truth_memories" in t1 else None
        return Packet(str(d["session_id"]), _turns(d.get("dialogue") or [], f"{where}.dialogue"), gold, outputs,
                      _task2(d.get("task2") or {}, f"{where}.task2"), _task3(d.get("task3") or {}, f"{where}.task3"),
                      _task4(d.get("task4") or [], f"{where}.task4"), where)
    except ValueError as exc:  # MemoryError_ names the item and field
        raise AlpsBenchDataError(f"{where}: {exc}") from exc


def load_packet(path: str | Path) -> Packet:
    """Read one ``sess_*.json`` packet."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AlpsBenchDataError(f"{path}: not JSON ({exc})") from exc
    return packet_from_dict(d, str(path))


def packet_paths(folder: str | Path) -> list[Path]:
    """The packets under ``folder`` (any depth), sorted by path; a file is taken as a one-packet list."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise FileNotFoundError(f"AlpsBench data folder not found: {folder}")
    paths = sorted(folder.rglob("sess_*.json"))
    if not paths:
        raise AlpsBenchDataError(f"{folder} holds no AlpsBench packets (sess_*.json)")
    return paths


def iter_packets(folder: str | Path, limit: int | None = None) -> Iterator[Packet]:
    """Packets under ``folder`` in path order (at most ``limit``)."""
    for i, p in enumerate(packet_paths(folder)):
        if limit is not None and i >= limit:
            return
        yield load_packet(p)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file (``model_input.jsonl``, predictions); a Git LFS pointer is a clear error."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if text.startswith("version https://git-lfs"):
        raise AlpsBenchDataError(f"{path} is a Git LFS pointer, not data: fetch the LFS object or build rows from "
                                 "the annotation packets")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AlpsBenchDataError(f"{path}:{n}: not JSON ({exc})") from exc
    return rows


def session_split(session_id: str, test_share: int = 5) -> str:
    """``"test"`` for one session in ``test_share`` (by SHA-256 of the id, so fixed and independent of file order),
    else ``"train"``: the split by session that training and held-out evaluation share."""
    import hashlib

    return "test" if int(hashlib.sha256(session_id.encode()).hexdigest(), 16) % test_share == 0 else "train"


def _dialogue_rows(turns: list[Turn]) -> list[dict[str, str]]:
    return [{"role": t.role, "text": t.text} for t in turns]


def _row(task: str, bid: str, packet: Packet, inp: dict, gold: dict, **extra: Any) -> tuple[dict, dict]:
    head = {"benchmark_id": bid, "task": task, **extra, "session_id": packet.session_id}
    return {**head, "input": inp}, {**head, "gold": gold}


def release_rows(packet: Packet, task: str, ability: str | None = None) -> list[tuple[dict, dict]]:
    """(model_input row, reference_output row) pairs of one packet for ``task`` (``task1`` .. ``task4``), in the
    public release's shape (Task 4: one row per ability record, ``ability`` required)."""
    if task == "task1" and packet.task1_gold is not None:
        return [_row("task1", packet.session_id, packet, {"dialogue": _dialogue_rows(packet.dialogue)},
                     {"memory_items": [m.to_dict() for m in packet.task1_gold]})]
    if task == "task2" and packet.task2 is not None:
        t = packet.task2
        return [_row("task2", packet.session_id, packet,
                     {"old_dialogue": _dialogue_rows(packet.dialogue), "new_dialogue": _dialogue_rows(t.new_dialogue),
                      "memory": [m.to_dict() for m in t.pool_before]},
                     {"answer": [m.to_dict() for m in t.gold_after]})]
    if task == "task3" and packet.task3 is not None:
        t = packet.task3
        return [_row("task3", packet.session_id, packet, {"candidate_memories": t.candidates, "query": t.query},
                     {"selected_memory_id": t.gold_id, "selected_memory": {"memory_id": t.gold_id,
                                                                          "value": t.gold_value}})]
    if task == "task4":
        out = []
        for k, r in enumerate(x for x in packet.task4 if x.ability == ability):
            sel = {"memory_id": r.memory_id, "value": r.memory_value}
            query = str(r.queries[0].get("query") or "") if r.queries else ""
            model_input = {"query": query, **({"selected_memory": sel} if ability == "ability1" else
                                              {"dialogue_history": _dialogue_rows(packet.dialogue)})}
            out.append(_row("task4", f"{packet.session_id}__{ability}_{k}", packet,
                            {"query": query, "queries": r.queries, "model_input": model_input},
                            {"memory_key": r.memory_id, "selected_memory": sel}, ability=ability))
        return out
    return []


__all__ = ["AlpsBenchDataError", "Packet", "Task2Item", "Task3Item", "Task4Item", "Turn", "iter_packets",
           "load_packet", "packet_from_dict", "packet_paths", "read_jsonl", "release_rows", "session_split"]
