"""training.loop.train_loop: the one small loop of the demo and the benchmarks (issue 11), and the LoRA set-up
with per-layer choices it trains."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from flythinker.hub import tiny_config
from flythinker.modeling import FlyThinkerForCausalLM
from flythinker.training import (
    FlyThinkerCollator,
    apply_lora,
    merged_state_dict,
    set_trainable,
    train_loop,
    trainable_state_dict,
)
from flythinker.training.loop import batch_indices, param_groups
from flythinker.training.toy import char_tokenizer, reverse_task, secret_task
from flythinker.training.trainable import lora_parts

TOK = char_tokenizer()
COLLATE = FlyThinkerCollator(tokenizer=TOK)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster on a shared 2-core machine
    yield
    torch.set_num_threads(n)


def tiny_pair(projection="pad", seed=0, layers=2):
    torch.manual_seed(seed)
    g = AutoModelForCausalLM.from_config(tiny_config(hidden_size=64, num_hidden_layers=layers))
    r = AutoModelForCausalLM.from_config(tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                                     num_hidden_layers=layers))
    return FlyThinkerForCausalLM.from_pair(g, r, fusion_lambda=0.5, projection=projection)


def benchmark_loop_before_issue_11(model, feats, steps, batch, lr, reasoner_lr_scale, seed):
    """benchmarks/personalization.py's own loop as it was (the oracle for reproducibility)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rsn = {id(p) for p in model.reasoner.parameters()}
    groups = [{"params": [p for p in params if id(p) not in rsn], "lr": lr},
              {"params": [p for p in params if id(p) in rsn], "lr": lr * reasoner_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    order = random.Random(seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**COLLATE(order.sample(feats, batch))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_reproduces_the_benchmark_loop_exactly():
    """Same batches, same optimizer groups and schedule: bit-identical losses and weights to the loop
    benchmarks/personalization.py had, so its numbers stay reproducible."""
    feats = secret_task(24, seed=1)
    ref_model, model = tiny_pair(projection="linear"), tiny_pair(projection="linear")
    want = benchmark_loop_before_issue_11(ref_model, feats, steps=12, batch=4, lr=3e-3, reasoner_lr_scale=0.5,
                                          seed=2)
    got = train_loop(model, feats, COLLATE, steps=12, batch_size=4, lr=3e-3, reasoner_lr=1.5e-3, weight_decay=0.01,
                     betas=(0.9, 0.98), warmup_steps=max(1, 12 // 20), order="sample", seed=2)
    assert got.losses == want and got.seconds > 0
    for (name, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not model.training  # left in eval mode


def test_learns_and_reports_progress():
    model = tiny_pair()
    data = reverse_task(64, seed=0)
    seen = []
    result = train_loop(model, data, COLLATE, steps=30, batch_size=8, lr=3e-3,
                        progress=lambda step, losses: seen.append((step, len(losses))))
    assert seen == [(i, i + 1) for i in range(30)]
    assert len(result.losses) == 30 and sum(result.losses[-5:]) < sum(result.losses[:5])
    before = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    assert train_loop(model, data, COLLATE, steps=0, batch_size=8, lr=3e-3).losses == []  # 0 steps: no change
    assert all(torch.equal(v, trainable_state_dict(model)[k]) for k, v in before.items())


def test_batch_orders():
    shuffle = batch_indices(10, 5, 4, order="shuffle", seed=3)
    flat = [i for b in shuffle for i in b]
    assert sorted(flat[:10]) == list(range(10)) and flat[10:] == flat[:10]  # one permutation, cycled
    sample = batch_indices(10, 50, 4, order="sample", seed=3)
    assert all(len(set(b)) == 4 for b in sample) and sample == batch_indices(10, 50, 4, order="sample", seed=3)
    assert sample != batch_indices(10, 50, 4, order="sample", seed=4)
    with pytest.raises(ValueError, match="order must be"):
        batch_indices(10, 1, 2, order="random")
    with pytest.raises(ValueError, match="without repeats"):
        batch_indices(3, 1, 4, order="sample")
    with pytest.raises(ValueError, match="at least one example"):
        batch_indices(0, 1, 1)


def test_param_groups_and_errors():
    model = tiny_pair(projection="linear")
    groups = {g["part"]: g for g in param_groups(model, 1e-3, reasoner_lr=2e-3, fusion_lr=5e-2)}
    assert {k: g["lr"] for k, g in groups.items()} == {"generator": 1e-3, "projection": 5e-2, "reasoner": 2e-3}
    assert [p for g in groups.values() for p in g["params"]] != []
    assert {id(p) for p in groups["projection"]["params"]} == {id(p) for p in model.latent_proj.parameters()}
    set_trainable(model, "generator")
    assert [g["part"] for g in param_groups(model, 1e-3, fusion_lr=1.0)] == ["generator"]
    plain = AutoModelForCausalLM.from_config(tiny_config())
    assert [g["part"] for g in param_groups(plain, 1e-3, fusion_lr=1.0)] == ["generator"]  # a plain LM
    plain.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_loop(plain, reverse_task(4), COLLATE, steps=1, batch_size=2, lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        train_loop(model, reverse_task(4), COLLATE, steps=1, batch_size=2, lr=1e-3, warmup_steps=0)


def test_per_layer_lora_goes_through_apply_lora():
    """The demo's choice (LoRA on every generator layer, on the top reasoner layer only) made with apply_lora, so
    lora_parts / merged_state_dict see it, and the loop trains the adapters only."""
    model = tiny_pair(layers=3)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(model, "generator", r=4, alpha=8, target_modules=targets)
    apply_lora(model, "reasoner", r=4, alpha=8, target_modules=targets, layers=[2])
    set_trainable(model, ("generator", "reasoner"))
    assert set(lora_parts(model)) == {"generator", "reasoner"}
    state = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    assert state and all(".lora_" in k for k in state)
    r_layers = {k.split(".layers.")[1].split(".")[0] for k in state if k.startswith("reasoner.")}
    g_layers = {k.split(".layers.")[1].split(".")[0] for k in state if k.startswith("generator.")}
    assert r_layers == {"2"} and g_layers == {"0", "1", "2"}
    train_loop(model, secret_task(16), COLLATE, steps=3, batch_size=4, lr=1e-2)
    after = trainable_state_dict(model)
    assert any(not torch.equal(after[k], v) for k, v in state.items() if "lora_B" in k)
    assert after[next(iter(after))].data_ptr() == dict(model.named_parameters())[next(iter(after))].data_ptr()
    merged = merged_state_dict(model)
    assert not any("lora_" in k for k in merged) and "generator.model.layers.0.mlp.up_proj.weight" in merged
