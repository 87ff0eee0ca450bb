"""Split context inside one vLLM request: which scheduled tokens each stack reads, at which of its own positions.

A split request's token stream is `S = r_0..r_{Q-1} ++ g_0..g_{P-1} ++ y_0 y_1 ...` (reasoner view, generator view,
reply); vLLM schedules it like any prompt + reply, position i = index in S. The reasoner reads `r ++ y`, the
generator `g ++ y` (docs/design.md), each at its own positions:

    reasoner: i < Q -> position i;   i >= Q + P -> position i - P;   the generator view is skipped
    generator: i >= Q -> position i - Q;                             the reasoner view is skipped
    fused:     generator token i >= Q + P - 1 reads the reasoner latent at reasoner position i - P - 1

(G's last prompt position P - 1 receives R's position Q - 2, reply token k receives R's Q - 2 + k.) Shared-context
rows in the same batch keep i -> i for both and read i - 1. Each stack runs on its subset with attention metadata
rebuilt for it (`stack_metadata`): its own query counts, context lengths and KV slots, through the request's one
block table (both streams are shorter than S, whose blocks vLLM allocated).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class StackTokens:
    """One stack's share of the N scheduled tokens: `take [n]` indices into them, `rows [n]` batch rows,
    `positions [n]` the stack's own positions, `counts [R]` tokens per row, `seq_lens [R]` context after the step."""

    take: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    counts: torch.Tensor
    seq_lens: torch.Tensor


@dataclass
class SplitPlan:
    reasoner: StackTokens
    generator: StackTokens
    src_positions: torch.Tensor  # [n_g] reasoner position whose latent each generator token reads
    src_valid: torch.Tensor  # [n_g] bool


def row_of_tokens(query_start_loc: torch.Tensor, n: int) -> torch.Tensor:
    """Batch row `[n]` of each scheduled token (vLLM lays tokens out row by row)."""
    counts = (query_start_loc[1:] - query_start_loc[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)[:n]


def plan(positions: torch.Tensor, input_ids: torch.Tensor, query_start_loc: torch.Tensor, rows: dict
         ) -> SplitPlan | None:
    """The split plan of this step, or None when no scheduled row is a split request.

    positions, input_ids: `[n]` scheduled tokens (padding excluded); query_start_loc: `[R + 1]`; rows: batch row ->
    `RowInfo` (flythinker.serving.requests.ROWS). Raises if a scheduled prompt token is not the row's prompt token
    (the row bookkeeping would be out of step with vLLM's batch) or if a row's reasoner view leaves no generator
    prompt.
    """
    R = query_start_loc.numel() - 1
    info = {r: rows[r] for r in range(R) if r in rows}
    if not info:
        return None
    n = positions.numel()
    req = row_of_tokens(query_start_loc, n)
    Q = torch.zeros(R, dtype=torch.long)
    L = torch.zeros(R, dtype=torch.long)
    for r, ri in info.items():
        if not 0 < ri.reasoner_tokens < ri.prompt_len:
            raise ValueError(f"flythinker split context: reasoner view of {ri.reasoner_tokens} tokens in a prompt of "
                             f"{ri.prompt_len} (the generator view needs at least one token)")
        Q[r], L[r] = ri.reasoner_tokens, ri.prompt_len
        sel = (req == r) & (positions < ri.prompt_len)
        want = torch.tensor(ri.prompt_ids, dtype=input_ids.dtype)[positions[sel].long()]
        if not torch.equal(input_ids[sel].cpu(), want):
            raise RuntimeError("flythinker split context: scheduled tokens do not match the request's prompt (the "
                               "per-row bookkeeping is out of step with vLLM's batch)")
    i = positions.long().cpu()
    req = req.cpu()
    q, p = Q[req], (L - Q)[req]
    split = q > 0
    in_r = ~split | (i < q) | (i >= q + p)
    in_g = ~split | (i >= q)
    r_pos = torch.where(split & (i >= q + p), i - p, i)
    g_pos = torch.where(split, i - q, i)
    src = torch.where(split, i - p - 1, i - 1)
    valid = torch.where(split, i >= q + p - 1, torch.ones_like(split)) & (src >= 0)
    ends = torch.zeros(R, dtype=torch.long).scatter_reduce(0, req, i + 1, reduce="amax", include_self=False)
    Pr = L - Q
    r_len = torch.where(Q > 0, torch.minimum(ends, Q) + (ends - (Q + Pr)).clamp_min(0), ends)
    g_len = torch.where(Q > 0, (ends - Q).clamp_min(0), ends)
    return SplitPlan(reasoner=_stack(in_r, req, r_pos, r_len, R), generator=_stack(in_g, req, g_pos, g_len, R),
                     src_positions=src[in_g], src_valid=valid[in_g])


def _stack(mask: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, seq_lens: torch.Tensor, R: int) -> StackTokens:
    take = mask.nonzero().squeeze(1)
    counts = torch.bincount(req[take], minlength=R)
    return StackTokens(take=take, rows=req[take], positions=pos[take], counts=counts, seq_lens=seq_lens)


def slots_of(block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block: int) -> torch.Tensor:
    """KV slot `[n]` of (row, position) pairs through the block table (`[R, max_blocks]`, `block` tokens each)."""
    rows, positions = rows.long(), positions.long()
    return block_table[rows, positions // block].long() * block + positions % block


def stack_metadata(md, layer, tokens: StackTokens, block: int, dtype: torch.dtype):
    """vLLM CPU attention metadata `md` re-described for one stack's tokens (same block table, own slots/lengths)."""
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    if not isinstance(md, CPUAttentionMetadata):
        raise NotImplementedError(f"flythinker split context: attention metadata {type(md).__name__} is not "
                                  "supported (vLLM's CPU backend only so far)")
    # rows this stack has no token of in this step (a split request inside the other stack's view) are left out
    # (the kernel's work split is built for rows with a query)
    active = (tokens.counts > 0).nonzero().squeeze(1)
    counts = tokens.counts[active]
    qsl = torch.zeros(active.numel() + 1, dtype=md.query_start_loc.dtype)
    qsl[1:] = torch.cumsum(counts, 0)
    seq = tokens.seq_lens[active].to(md.seq_lens.dtype)
    slot = slots_of(md.block_table, tokens.rows, tokens.positions, block).to(md.slot_mapping.dtype)
    window = layer.impl.sliding_window
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=int(active.numel()), num_heads=layer.num_heads, num_kv_heads=layer.num_kv_heads,
        head_dim=layer.head_size, seq_lens=seq, dtype=dtype, query_start_loc=qsl, causal=md.causal,
        sliding_window_size=-1 if window is None else window, isa=layer.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=layer.kv_cache_dtype)
    return dataclasses.replace(md, num_actual_tokens=int(tokens.take.numel()),
                               max_query_len=int(counts.max()), query_start_loc=qsl, block_table=md.block_table[active],
                               max_seq_len=int(seq.max()), seq_lens=seq, slot_mapping=slot,
                               scheduler_metadata=sched, num_decode_tokens=0, use_sdpa_prefill=False)


__all__ = ["SplitPlan", "StackTokens", "plan", "row_of_tokens", "slots_of", "stack_metadata"]
