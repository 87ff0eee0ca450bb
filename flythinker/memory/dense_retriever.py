"""Dense retrieval of memories: a frozen causal LM as a dual encoder, with a small trained projection head.

- :class:`FrozenEncoder` pools the hidden states of a frozen causal LM (by default SmolLM2-135M-Instruct, loaded
  offline by :func:`flythinker.hub.load_pretrained`): for each of its ``layers`` (hidden-state indices, 0 = the
  token embeddings) the mean over the text's tokens and the last token, a `[L, 2, H]` feature per text. Each text
  is wrapped in a query or memory template, run once (length-sorted batches, ``torch.inference_mode``, no LM head)
  and memoised per (kind, text); the memo can be saved to and reloaded from a safetensors file, refused when it
  was written by another encoder spec (model, layers, templates, length).
- :class:`FeatureSpec` picks the layers and poolings the head reads: `[N, L, 2, H]` -> `[N, D]`.
- :class:`ProjectionHead` standardises the features (query and memory sides each with their own mean and
  standard deviation) and maps them by a linear layer per side (or one shared) to unit vectors `[N, d]`; the
  score of a (query, memory) pair is their cosine.
- :func:`flythinker.memory.dense_training.train_head` trains the head on cached features of (query, gold
  memory) pairs with an in-batch-negatives contrastive loss.
- :class:`DualEncoder` (encoder + feature spec + head, optionally a BM25 weight for a hybrid score) called with
  texts gives a :class:`DenseRetriever`, which has :class:`~flythinker.memory.retrieval.BM25Retriever`'s
  ``scores`` / ``rank`` interface, so ``flythinker.memory.retrieve(..., retriever=dual)`` and the reasoner's view
  (``memory_views(..., retriever=dual)``) rank with it. :meth:`DualEncoder.save` writes ``head.safetensors`` and
  ``config.json`` into a folder atomically; :meth:`DualEncoder.load` reads them (no pickle anywhere).

Hybrid score: ``z(cosine) + w * z(BM25)`` with each score standardised over the candidates (a constant score
contributes 0).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "smollm2-135m-instruct"
POOLINGS = ("mean", "last")
KINDS = ("query", "memory")
QUERY_TEMPLATE = "A user asks: {text}\nThe fact about the user this request needs:"
MEMORY_TEMPLATE = "A fact about the user: {text}"
CACHE_FORMAT = "flythinker.dense_features/1"
RETRIEVER_FORMAT = "flythinker.dense_retriever/1"
HEAD_FILE, CONFIG_FILE = "head.safetensors", "config.json"


class DenseRetrieverError(ValueError):
    """Bad input to the dense retriever (empty bank, mismatched dimensions, a cache or folder of another spec)."""


def default_layers(n_layers: int) -> tuple[int, ...]:
    """Hidden-state indices at a third, two thirds and the end of a model of ``n_layers`` layers (30 -> 10, 20, 30)."""
    return tuple(sorted({max(1, n_layers // 3), max(1, 2 * n_layers // 3), n_layers}))


@dataclass(frozen=True)
class EncoderSpec:
    """What a cached feature depends on: the model's name, the hidden-state ``layers`` (``None``: thirds of the
    depth, see :func:`default_layers`), the longest input in tokens and the two templates (``{text}`` is replaced
    by the text)."""

    model: str = DEFAULT_MODEL
    layers: tuple[int, ...] | None = None
    max_length: int = 256
    query_template: str = QUERY_TEMPLATE
    memory_template: str = MEMORY_TEMPLATE

    def key(self) -> str:
        """A short hash of the spec, naming its feature cache."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def wrap(self, text: str, kind: str) -> str:
        """``text`` in the template of ``kind`` (``query`` or ``memory``)."""
        return (self.query_template if kind == "query" else self.memory_template).replace("{text}", text)


def _spec_from_dict(d: dict[str, Any]) -> EncoderSpec:
    layers = d.get("layers")
    return EncoderSpec(**{**d, "layers": None if layers is None else tuple(int(x) for x in layers)})


class FrozenEncoder:
    """Pooled hidden states of a frozen causal LM, memoised per (kind, text).

    Args:
        model: a HF causal LM (its base model runs; the LM head is never applied); frozen and put in eval mode.
        tokenizer: its tokenizer (padding is done here, so a tokenizer without a pad token works).
        spec: :class:`EncoderSpec`; its ``layers`` must lie in ``0..num_hidden_layers``.
        batch_size: texts per forward pass (sorted by length, so a batch pads little).

    ``encode(texts, kind)`` -> `[N, L, 2, H]` float32 (CPU): for each layer, the mean over the tokens and the last
    token. ``texts_encoded`` / ``tokens_encoded`` / ``seconds`` count the forward passes' work.
    """

    def __init__(self, model, tokenizer, spec: EncoderSpec | None = None, *, batch_size: int = 32):
        spec = spec or EncoderSpec()
        n_layers = int(model.config.num_hidden_layers)
        layers = default_layers(n_layers) if spec.layers is None else tuple(spec.layers)
        if not layers or any(not 0 <= x <= n_layers for x in layers):
            raise DenseRetrieverError(f"encoder layers must be hidden-state indices in 0..{n_layers}, got {layers}")
        if batch_size < 1:
            raise DenseRetrieverError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = replace(spec, layers=layers)
        self.model = model.eval().requires_grad_(False)
        self.base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.hidden_size = int(model.config.hidden_size)
        self.device = next(model.parameters()).device
        self._memo: dict[tuple[str, str], torch.Tensor] = {}
        self.texts_encoded = self.tokens_encoded = 0
        self.seconds = 0.0

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.spec.layers or ())

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """`(L, 2, H)`: layers, poolings (mean, last), hidden size."""
        return (len(self.layers), len(POOLINGS), self.hidden_size)

    def __len__(self) -> int:
        return len(self._memo)

    def cached(self, text: str, kind: str = "memory") -> bool:
        return (kind, text) in self._memo

    def encode(self, texts: Sequence[str], kind: str = "memory") -> torch.Tensor:
        """Features `[N, L, 2, H]` of ``texts`` as ``kind`` (``query`` / ``memory``); only texts not yet in the
        memo run through the model. O(new tokens) model work, O(N) lookups."""
        if kind not in KINDS:
            raise DenseRetrieverError(f"kind must be one of {KINDS}, got {kind!r}")
        texts = [str(t) for t in texts]
        missing = [t for t in dict.fromkeys(texts) if (kind, t) not in self._memo]
        if missing:
            self._encode_missing(missing, kind)
        if not texts:
            return torch.empty((0, *self.feature_shape))
        return torch.stack([self._memo[(kind, t)] for t in texts])

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length)["input_ids"]
        fallback = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        return [list(ids) or [fallback] for ids in enc]

    def _encode_missing(self, texts: list[str], kind: str) -> None:
        t0 = time.perf_counter()
        ids = self._token_ids([self.spec.wrap(t, kind) for t in texts])
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            feats = self._forward([ids[i] for i in idx])
            for i, f in zip(idx, feats):
                self._memo[(kind, texts[i])] = f.clone()
            self.tokens_encoded += sum(len(ids[i]) for i in idx)
        self.texts_encoded += len(texts)
        self.seconds += time.perf_counter() - t0

    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded forward of token rows -> `[B, L, 2, H]` float32 on the CPU."""
        T = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        with torch.inference_mode():
            out = self.base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            output_hidden_states=True, use_cache=False)
        m = mask.unsqueeze(-1).float()
        last = mask.sum(1) - 1
        rows_idx = torch.arange(len(rows))
        per_layer = []
        for layer in self.layers:
            h = out.hidden_states[layer].float().cpu()
            mean = (h * m).sum(1) / m.sum(1)
            per_layer.append(torch.stack([mean, h[rows_idx, last]], 1))
        return torch.stack(per_layer, 1)

    def save_cache(self, path: str | os.PathLike) -> Path:
        """Write the memo (features and their (kind, text) keys, with the spec) to a safetensors file atomically."""
        from safetensors.torch import save

        from flythinker.hub.atomic import atomic_write_bytes

        keys = list(self._memo)
        feats = torch.stack([self._memo[k] for k in keys]) if keys else torch.empty((0, *self.feature_shape))
        meta = {"format": CACHE_FORMAT, "spec": json.dumps(asdict(self.spec), sort_keys=True),
                "keys": json.dumps(keys, ensure_ascii=False)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, save({"features": feats.contiguous()}, metadata=meta))

    def load_cache(self, path: str | os.PathLike) -> int:
        """Add the features of a cache written by :meth:`save_cache` to the memo; returns how many were added.
        ``DenseRetrieverError`` if it was written by another spec or has another feature shape."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != CACHE_FORMAT:
                raise DenseRetrieverError(f"{path} is not a dense feature cache (format {meta.get('format')!r})")
            spec = _spec_from_dict(json.loads(meta["spec"]))
            if spec != self.spec:
                raise DenseRetrieverError(f"{path} was written by another encoder spec ({spec}), not {self.spec}")
            feats = fh.get_tensor("features")
        keys = [tuple(k) for k in json.loads(meta["keys"])]
        if tuple(feats.shape[1:]) != self.feature_shape or len(keys) != feats.shape[0]:
            raise DenseRetrieverError(f"{path}: features {tuple(feats.shape)} for {len(keys)} keys do not match "
                                      f"the encoder's {self.feature_shape}")
        added = 0
        for k, row in zip(keys, feats):
            if k not in self._memo:
                self._memo[k] = row.clone()
                added += 1
        return added


@dataclass(frozen=True)
class FeatureSpec:
    """The layers (hidden-state indices, a subset of the encoder's) and poolings (``mean`` / ``last``) the head
    reads; ``select`` flattens them: `[N, L, 2, H]` -> `[N, len(layers) * len(pooling) * H]`."""

    layers: tuple[int, ...]
    pooling: tuple[str, ...] = POOLINGS

    def dim(self, hidden_size: int) -> int:
        return len(self.layers) * len(self.pooling) * hidden_size

    def select(self, feats: torch.Tensor, encoder_layers: Sequence[int]) -> torch.Tensor:
        if feats.dim() != 4 or feats.shape[2] != len(POOLINGS):
            raise DenseRetrieverError(f"features must be [N, L, {len(POOLINGS)}, H], got {tuple(feats.shape)}")
        missing = [x for x in self.layers if x not in encoder_layers]
        bad = [p for p in self.pooling if p not in POOLINGS]
        if missing or bad or not self.layers or not self.pooling:
            raise DenseRetrieverError(f"feature spec {self} does not fit encoder layers {tuple(encoder_layers)} "
                                      f"and poolings {POOLINGS}")
        li = [list(encoder_layers).index(x) for x in self.layers]
        pi = [POOLINGS.index(p) for p in self.pooling]
        return feats[:, li][:, :, pi].reshape(feats.shape[0], -1)


class ProjectionHead(nn.Module):
    """Standardise then project: `[N, in_dim]` features -> `[N, out_dim]` unit vectors, per side.

    Args:
        in_dim: feature dimension D.
        out_dim: embedding dimension d (``identity=True`` requires ``out_dim == in_dim``).
        tied: one projection for queries and memories (else one each, initialised equal).
        temperature: initial softmax temperature of the training loss (its log is learned).
        identity: no projection (the untrained "frozen features" scorer: cosine of standardised features).
    """

    def __init__(self, in_dim: int, out_dim: int = 256, *, tied: bool = False, temperature: float = 0.05,
                 identity: bool = False):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or (identity and out_dim != in_dim):
            raise DenseRetrieverError(f"bad head dimensions in_dim={in_dim} out_dim={out_dim} identity={identity}")
        self.in_dim, self.out_dim, self.tied, self.identity = in_dim, out_dim, tied, identity
        for side in ("q", "m"):
            self.register_buffer(f"{side}_mean", torch.zeros(in_dim))
            self.register_buffer(f"{side}_std", torch.ones(in_dim))
        self.query = None if identity else nn.Linear(in_dim, out_dim, bias=False)
        self.memory = None if tied or identity else nn.Linear(in_dim, out_dim, bias=False)
        if self.memory is not None:
            with torch.no_grad():
                self.memory.weight.copy_(self.query.weight)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @torch.no_grad()
    def fit_standardizer(self, queries: torch.Tensor, memories: torch.Tensor) -> None:
        """Per-feature mean and standard deviation of each side (`[Nq, D]`, `[Nm, D]`)."""
        for side, x in (("q", queries), ("m", memories)):
            x = self._check(x).float()
            getattr(self, f"{side}_mean").copy_(x.mean(0))
            getattr(self, f"{side}_std").copy_(x.std(0, unbiased=False).clamp_min(1e-4) if len(x) > 1
                                               else torch.ones_like(x[0]))

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise DenseRetrieverError(f"the head takes [N, {self.in_dim}] features, got {tuple(x.shape)}")
        return x

    def embed_query(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, D]` -> `[N, d]` unit vectors."""
        x = (self._check(x) - self.q_mean) / self.q_std
        return F.normalize(x if self.query is None else self.query(x), dim=-1)

    def embed_memory(self, x: torch.Tensor) -> torch.Tensor:
        """`[N, D]` -> `[N, d]` unit vectors."""
        x = (self._check(x) - self.m_mean) / self.m_std
        proj = self.query if self.memory is None else self.memory
        return F.normalize(x if proj is None else proj(x), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100.0)).exp()


def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over the candidates; zeros when ``x`` is constant."""
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


class DualEncoder:
    """A frozen encoder, the features its head reads and the head: ``dual(texts)`` -> :class:`DenseRetriever`.

    Args:
        encoder: :class:`FrozenEncoder`.
        head: :class:`ProjectionHead` whose ``in_dim`` is ``features.dim(encoder.hidden_size)``.
        features: :class:`FeatureSpec` (default: all the encoder's layers, both poolings).
        bm25_weight: weight of the standardised BM25 score in a hybrid score (0: dense only).

    Memory vectors are memoised per text (the head is frozen once in a DualEncoder); ``with_bm25_weight`` gives a
    copy sharing encoder, head and memo.
    """

    def __init__(self, encoder: FrozenEncoder, head: ProjectionHead, features: FeatureSpec | None = None, *,
                 bm25_weight: float = 0.0):
        self.encoder, self.head = encoder, head.eval()
        self.features = features or FeatureSpec(encoder.layers)
        want = self.features.dim(encoder.hidden_size)
        self.features.select(torch.zeros((1, *encoder.feature_shape)), encoder.layers)  # layers / poolings fit
        if head.in_dim != want:
            raise DenseRetrieverError(f"the head takes {head.in_dim} features but {self.features} of a "
                                      f"{encoder.hidden_size}-wide model gives {want}")
        if bm25_weight < 0:
            raise DenseRetrieverError(f"bm25_weight must be >= 0, got {bm25_weight}")
        self.bm25_weight = float(bm25_weight)
        self._memo: dict[str, torch.Tensor] = {}

    def with_bm25_weight(self, weight: float) -> DualEncoder:
        other = copy.copy(self)
        if weight < 0:
            raise DenseRetrieverError(f"bm25_weight must be >= 0, got {weight}")
        other.bm25_weight = float(weight)
        return other

    def features_of(self, texts: Sequence[str], kind: str) -> torch.Tensor:
        """Selected features `[N, D]` (encoded on first use)."""
        return self.features.select(self.encoder.encode(texts, kind), self.encoder.layers)

    @torch.no_grad()
    def query_vectors(self, queries: Sequence[str]) -> torch.Tensor:
        """`[N, d]` unit vectors of queries."""
        return self.head.embed_query(self.features_of(queries, "query"))

    @torch.no_grad()
    def memory_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """`[N, d]` unit vectors of memory texts (memoised per text)."""
        texts = [str(t) for t in texts]
        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if new:
            for t, v in zip(new, self.head.embed_memory(self.features_of(new, "memory"))):
                self._memo[t] = v
        if not texts:
            return torch.empty((0, self.head.out_dim))
        return torch.stack([self._memo[t] for t in texts])

    def __call__(self, texts: Sequence[str]) -> DenseRetriever:
        return DenseRetriever(texts, self)

    def config(self) -> dict[str, Any]:
        return {"format": RETRIEVER_FORMAT, "encoder": asdict(self.encoder.spec),
                "features": {"layers": list(self.features.layers), "pooling": list(self.features.pooling)},
                "head": {"in_dim": self.head.in_dim, "out_dim": self.head.out_dim, "tied": self.head.tied,
                         "identity": self.head.identity},
                "bm25_weight": self.bm25_weight}

    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/head.safetensors`` (the head's tensors) and ``folder/config.json``, replaced atomically."""
        from safetensors.torch import save_file

        from flythinker.hub.atomic import atomic_directory

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(folder) as tmp:
            state = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, str(tmp / HEAD_FILE), metadata={"format": RETRIEVER_FORMAT})
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config(), indent=1), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, model=None, tokenizer=None, *, encoder: FrozenEncoder | None = None,
             batch_size: int = 32) -> DualEncoder:
        """A saved dual encoder; the frozen model is loaded by name (``flythinker.hub.load_pretrained``) unless
        ``model`` and ``tokenizer`` (or an ``encoder`` of the same spec) are given."""
        folder = Path(folder)
        cfg = read_retriever_config(folder)
        spec = _spec_from_dict(cfg["encoder"])
        if encoder is None:
            if model is None:
                from flythinker.hub import load_pretrained

                model, tokenizer = load_pretrained(spec.model)
            encoder = FrozenEncoder(model, tokenizer, spec, batch_size=batch_size)
        elif encoder.spec != spec:
            raise DenseRetrieverError(f"{folder} was trained on encoder spec {spec}, the encoder given has "
                                      f"{encoder.spec}")
        h = cfg["head"]
        head = ProjectionHead(int(h["in_dim"]), int(h["out_dim"]), tied=bool(h["tied"]),
                              identity=bool(h.get("identity")))
        _load_head_state(head, folder / HEAD_FILE)
        feats = FeatureSpec(tuple(int(x) for x in cfg["features"]["layers"]), tuple(cfg["features"]["pooling"]))
        return cls(encoder, head, feats, bm25_weight=float(cfg.get("bm25_weight", 0.0)))


def read_retriever_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a saved :class:`DualEncoder`; ``DenseRetrieverError`` when missing or of another format."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / HEAD_FILE).is_file():
        raise DenseRetrieverError(f"{folder} is not a saved dense retriever (needs {CONFIG_FILE} and {HEAD_FILE})")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(cfg, dict) or cfg.get("format") != RETRIEVER_FORMAT:
        raise DenseRetrieverError(f"{path} is not a {RETRIEVER_FORMAT} config")
    return cfg


def _load_head_state(head: ProjectionHead, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DenseRetrieverError(f"{path} does not fit the head of its config.json: {exc}") from None


class DenseRetriever:
    """Dense (or hybrid) retrieval over ``texts``: ``scores(query)`` -> `[len(texts)]`, ``rank(query, k)`` ->
    indices best first (ties: earlier text first), as :class:`~flythinker.memory.retrieval.BM25Retriever`.
    ``vectors``: the texts' `[n, d]` unit vectors."""

    def __init__(self, texts: Sequence[str], dual: DualEncoder):
        self.texts, self.dual = [str(t) for t in texts], dual
        if not self.texts:
            raise DenseRetrieverError("DenseRetriever needs at least one document (the memory bank is empty)")
        self.vectors = self.dual.memory_vectors(self.texts)
        self._bm25 = None
        if self.dual.bm25_weight > 0:
            from .retrieval import BM25Retriever

            self._bm25 = BM25Retriever(self.texts)

    def scores(self, query: str) -> np.ndarray:
        """Cosine of the query with every text; hybrid: ``z(cosine) + w * z(BM25)``."""
        s = (self.dual.query_vectors([query]) @ self.vectors.T)[0].numpy().astype(np.float64)
        if self._bm25 is not None:
            s = zscore(s) + self.dual.bm25_weight * zscore(self._bm25.scores(query).astype(np.float64))
        return s

    def rank(self, query: str, k: int | None = None) -> list[int]:
        order = np.argsort(-self.scores(query), kind="stable")
        return [int(i) for i in (order if k is None else order[:k])]


def frozen_dual(encoder: FrozenEncoder, features: FeatureSpec, queries: torch.Tensor,
                memories: torch.Tensor) -> DualEncoder:
    """The untrained scorer: cosine of standardised features (identity projection), standardised with the
    statistics of `[Nq, D]` query and `[Nm, D]` memory features."""
    head = ProjectionHead(queries.shape[1], queries.shape[1], identity=True)  # no weights: a 1-by-1 matmul saved
    head.fit_standardizer(queries, memories)
    return DualEncoder(encoder, head, features)


__all__ = ["DEFAULT_MODEL", "MEMORY_TEMPLATE", "POOLINGS", "QUERY_TEMPLATE", "DenseRetriever", "DenseRetrieverError",
           "DualEncoder", "EncoderSpec", "FeatureSpec", "FrozenEncoder", "ProjectionHead", "default_layers",
           "frozen_dual", "read_retriever_config", "zscore"]
