"""What flythinker knows about a user: typed memory items (AlpsBench's schema), a per-user store written
atomically with every change recorded, the memory lifecycle (extract, update, retrieve, utilise) over any judge
backend, and the reasoner's view built from a store. See docs/alpsbench.md.
"""

from .operations import extract, judge_ability, retrieve, update, utilise
from .parse import OutputParseError, ParseStats, find_json, parse_memory_items, parse_selection
from .reasoner import MemoryViews, load_memories, memory_views, rank_memories
from .retrieval import BM25Retriever
from .schema import DO_NOT_REMEMBER, TAXONOMY, UNMAPPED, Evidence, MemoryError_, MemoryItem, items_from_list
from .store import MemoryStore, UpdateReport

__all__ = ["DO_NOT_REMEMBER", "TAXONOMY", "UNMAPPED", "BM25Retriever", "Evidence", "MemoryError_", "MemoryItem",
           "MemoryStore", "MemoryViews", "OutputParseError", "ParseStats", "UpdateReport", "extract", "find_json",
           "items_from_list", "judge_ability", "load_memories", "memory_views", "parse_memory_items",
           "parse_selection", "rank_memories", "retrieve", "update", "utilise"]
