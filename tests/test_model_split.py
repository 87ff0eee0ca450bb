"""Split context (docs/design.md) and fuse_prompt=False against explicit per-position reference computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import (
    EOS,
    PAD,
    left_pad,
    random_ids,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_pair,
)

from flythinker.alignment import positions_from_mask
from flythinker.configuration import IGNORE_INDEX

LAM = 0.9


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_pair(fusion_lambda=LAM)


def split_reference_logits(model, g: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One unpadded row, written out position by position: generator position p-1+k receives the reasoner latent
    of position q-2+k (k >= 0). Returns the generator logits `[p + L, V]`."""
    p, q = len(g), len(r)
    G, R = torch.cat([g, y]), torch.cat([r, y])
    hR = model.reasoner.model(input_ids=R[None]).last_hidden_state[0]  # [q + L, H_r]
    W = model.generator.get_input_embeddings().weight
    c = torch.linalg.vector_norm(W, dim=-1).mean()
    emb = W[G].clone()
    for i in range(len(G)):
        k = i - (p - 1)
        if k >= 0 and q - 2 + k >= 0:
            h = hR[q - 2 + k]
            emb[i, : h.shape[0]] += LAM * c / torch.linalg.vector_norm(h) * h
    return model.generator(inputs_embeds=emb[None]).logits[0]


def rows(seed: int):
    g = [random_ids(1, n, seed=seed + n)[0] for n in (3, 5)]
    r = [random_ids(1, n, seed=seed + 10 + n)[0] for n in (9, 6)]
    y = [random_ids(1, 4, seed=seed + 20 + i)[0] for i in range(2)]
    return g, r, y


@torch.no_grad()
def test_split_forward_with_labels_matches_reference_left_padded(model):
    g, r, y = rows(0)
    # pad = EOS: non-zero embedding
    G_ids, G_mask = left_pad([torch.cat([a, b]) for a, b in zip(g, y, strict=True)], EOS)
    R_ids, R_mask = left_pad([torch.cat([a, b]) for a, b in zip(r, y, strict=True)], EOS)
    labels = torch.full_like(G_ids, IGNORE_INDEX)
    for i in range(2):
        labels[i, -len(y[i]):] = y[i]
    out = model(G_ids, attention_mask=G_mask, labels=labels, reasoner_input_ids=R_ids,
                reasoner_attention_mask=R_mask, use_cache=False)
    assert out.logits is None  # default loss_impl="fused": no logits with labels
    nll, n = 0.0, 0
    for i in range(2):
        ref = split_reference_logits(model, g[i], r[i], y[i])
        nll += F.cross_entropy(ref[len(g[i]) - 1: -1], y[i], reduction="sum")
        n += len(y[i])
    torch.testing.assert_close(out.loss, nll / n, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_split_forward_logits_right_padded_training_batch():
    model = tiny_pair(fusion_lambda=LAM, loss_impl="naive")
    g, r, y = rows(1)
    y[1] = y[1][:2]  # different response lengths
    Tg = max(len(a) + len(b) for a, b in zip(g, y, strict=True))
    Tr = max(len(a) + len(b) for a, b in zip(r, y, strict=True))
    G_ids = torch.full((2, Tg), EOS)
    R_ids = torch.full((2, Tr), EOS)
    G_mask, R_mask = torch.zeros_like(G_ids), torch.zeros_like(R_ids)
    labels = torch.full_like(G_ids, IGNORE_INDEX)
    for i in range(2):
        a, b = torch.cat([g[i], y[i]]), torch.cat([r[i], y[i]])
        G_ids[i, : len(a)], G_mask[i, : len(a)] = a, 1
        R_ids[i, : len(b)], R_mask[i, : len(b)] = b, 1
        labels[i, len(g[i]): len(a)] = y[i]
    out = model(G_ids, attention_mask=G_mask, labels=labels, reasoner_input_ids=R_ids,
                reasoner_attention_mask=R_mask, use_cache=False)
    for i in range(2):
        ref = split_reference_logits(model, g[i], r[i], y[i])
        torch.testing.assert_close(out.logits[i, : len(ref)], ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_split_generate_matches_reference_and_rows_alone(model):
    g, r, _ = rows(2)
    G_ids, G_mask = left_pad(g, EOS)
    R_ids, R_mask = left_pad(r, EOS)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=EOS, eos_token_id=None)
    out = model.generate(G_ids, attention_mask=G_mask, reasoner_input_ids=R_ids, reasoner_attention_mask=R_mask,
                         **kw)
    P = G_ids.shape[1]
    for i in range(2):
        y = out[i, P:]
        ref = split_reference_logits(model, g[i], r[i], y)
        assert torch.equal(ref[len(g[i]) - 1: -1].argmax(-1), y), i
        alone = model.generate(g[i][None], reasoner_input_ids=r[i][None], **kw)
        assert torch.equal(alone[0, len(g[i]):], y)
    # the reasoner's prompt matters (it is a different conditioning than shared context)
    shared = model.generate(G_ids, attention_mask=G_mask, **kw)
    assert not torch.equal(shared, out)


@torch.no_grad()
def test_split_expansion_beams_and_return_sequences(model):
    g, r, _ = rows(3)
    G_ids, G_mask = left_pad(g, EOS)
    R_ids, R_mask = left_pad(r, EOS)
    kw = dict(max_new_tokens=4, pad_token_id=EOS, eos_token_id=None)
    torch.manual_seed(3)
    a = model.generate(G_ids, attention_mask=G_mask, reasoner_input_ids=R_ids, reasoner_attention_mask=R_mask,
                       do_sample=True, num_return_sequences=2, **kw)
    torch.manual_seed(3)
    b = model.generate(G_ids.repeat_interleave(2, 0), attention_mask=G_mask.repeat_interleave(2, 0),
                       reasoner_input_ids=R_ids.repeat_interleave(2, 0),
                       reasoner_attention_mask=R_mask.repeat_interleave(2, 0), do_sample=True, **kw)
    assert torch.equal(a, b)
    out = model.generate(G_ids, attention_mask=G_mask, reasoner_input_ids=R_ids, reasoner_attention_mask=R_mask,
                         num_beams=3, do_sample=False, length_penalty=0.0, return_dict_in_generate=True,
                         output_scores=True, **kw)
    P = G_ids.shape[1]
    for i in range(2):
        y = out.sequences[i, P:]
        ref = torch.log_softmax(split_reference_logits(model, g[i], r[i], y)[len(g[i]) - 1: -1], -1)
        torch.testing.assert_close(out.sequences_scores[i], ref.gather(-1, y[:, None]).sum(), atol=1e-4,
                                   rtol=1e-4)


@torch.no_grad()
def test_split_reasoner_prompt_of_one_token(model):
    """Q = 1: the generator's last prompt position has no reasoner latent (Q-2 = -1): it is not fused."""
    g = random_ids(1, 4, seed=40)
    r = random_ids(1, 1, seed=41)
    out = model(g, reasoner_input_ids=r, use_cache=False).logits
    torch.testing.assert_close(out, model.generator(g).logits, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fuse_prompt_false_generate_agrees_with_labels_rule():
    m = tiny_pair(fusion_lambda=LAM, fuse_prompt=False, loss_impl="naive")
    full = tiny_pair(fusion_lambda=LAM, fuse_prompt=True)
    ids = random_ids(2, 6, seed=42)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    out = m.generate(ids, **kw)
    labels = out.clone()
    labels[:, :6] = IGNORE_INDEX
    logits = m(out, labels=labels, use_cache=False).logits
    assert torch.equal(logits[:, 5:-1].argmax(-1), out[:, 6:])
    # prompt positions before the last one are not fused: they equal the plain generator
    torch.testing.assert_close(logits[:, :5], m.generator(out).logits[:, :5], atol=1e-5, rtol=1e-5)
    assert (logits[:, 5] - m.generator(out).logits[:, 5]).abs().max() > 1e-3
    assert not torch.equal(out, full.generate(ids, **kw))


@torch.no_grad()
def test_split_generate_right_padded_reasoner_prompt_equals_unpadded(model):
    """A right-padded reasoner prompt: the pending latent comes from its last *real* position, so the first
    response token is still fused and generation equals the unpadded prompt (also through fast_generate)."""
    from flythinker import fast_generate

    g, r, _ = rows(4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=EOS, eos_token_id=None)
    want = model.generate(g[0][None], reasoner_input_ids=r[0][None], **kw)
    R_ids = torch.cat([r[0], torch.full((3,), EOS)])[None]
    R_mask = torch.cat([torch.ones(len(r[0]), dtype=torch.long), torch.zeros(3, dtype=torch.long)])[None]
    got = model.generate(g[0][None], reasoner_input_ids=R_ids, reasoner_attention_mask=R_mask, **kw)
    assert torch.equal(got, want)
    fast = fast_generate(model, g[0][None], max_new_tokens=6, reasoner_input_ids=R_ids,
                         reasoner_attention_mask=R_mask, eos_token_id=None, pad_token_id=EOS)
    assert torch.equal(fast, want)
    with pytest.raises(ValueError, match="left-padded"):
        G_mask = torch.ones(1, len(g[0]) + 1, dtype=torch.long)
        G_mask[0, -1] = 0
        fast_generate(model, torch.cat([g[0], torch.tensor([EOS])])[None], attention_mask=G_mask,
                      max_new_tokens=2, reasoner_input_ids=r[0][None])


class _CumsumLog(torch.overrides.TorchFunctionMode):
    """Records the last-dim length of every cumsum run inside the block."""

    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.cumsum, torch.Tensor.cumsum):
            self.lengths.append(args[0].shape[-1])
        return func(*args, **(kwargs or {}))


def test_split_decode_reasoner_positions_from_the_cache():
    """Split-context decode keeps the reasoner's next position per row in the cache: over 20 steps with left- and
    right-padded reasoner prompts the reasoner sees the positions HF derives from its whole mask (cumsum - 1), and
    no step runs a cumsum over more than its new tokens (today's code re-cumsums the whole [B, L_r] mask)."""
    model = tiny_pair()
    G_ids, G_mask = left_pad([random_ids(1, n, seed=n)[0] for n in (5, 9, 7)])
    R_ids, R_mask = left_pad([random_ids(1, n, seed=n + 9)[0] for n in (12, 6, 10)])
    R_mask[2, -2:] = 0  # row 2 also right-padded: its next position is not its length
    seen = []
    hook = model.reasoner.get_decoder().register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw["position_ids"].clone(), kw["attention_mask"].clone())),
        with_kwargs=True)
    with torch.no_grad():
        out = model(input_ids=G_ids, attention_mask=G_mask, reasoner_input_ids=R_ids, reasoner_attention_mask=R_mask,
                    use_cache=True)
        cache, mask, pos = out.cache, G_mask, G_mask.sum(1, keepdim=True) - 1
        lengths = []
        for _ in range(20):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            mask, pos = torch.cat([mask, torch.ones_like(tok)], 1), pos + 1
            with _CumsumLog() as log:
                out = model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache)
            lengths += log.lengths
    hook.remove()
    assert len(seen) == 21
    full_mask = seen[-1][1]
    assert full_mask.shape == (3, R_ids.shape[1] + 20)
    assert torch.equal(full_mask[:, : R_ids.shape[1]], R_mask) and bool(full_mask[:, R_ids.shape[1]:].all())
    ref = positions_from_mask(full_mask)  # [B, Q + 20]
    for k, (p, m) in enumerate(seen[1:]):
        assert torch.equal(m, full_mask[:, : R_ids.shape[1] + k + 1])
        assert torch.equal(p, ref[:, R_ids.shape[1] + k][:, None]), k
    assert torch.equal(cache.reasoner_next_position, R_mask.sum(1) + 20)
    assert max(lengths, default=1) == 1, lengths  # only the new token's column
