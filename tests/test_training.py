"""Joint training: it learns, lambda = 0 leaves the reasoner without gradient, frozen parts get no gradient and no
optimizer state, LoRA trains/saves/loads on each model (per-layer too), Trainer checkpoints reload, checkpointing is
exact, and the small shared loop (training.loop.train_loop) reproduces the benchmark's old loop bit for bit."""

import copy
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments, get_cosine_schedule_with_warmup

from flythinker.modeling import FlyThinkerForCausalLM
from flythinker.training.collator import FlyThinkerCollator
from flythinker.training.loop import batch_indices, param_groups, train_loop
from flythinker.training.toy import char_tokenizer, reverse_task, secret_task, tiny_config
from flythinker.training.trainable import (
    apply_lora,
    autocast,
    enable_gradient_checkpointing,
    load_lora_adapters,
    lora_parts,
    merge_lora,
    merged_state_dict,
    parse_parts,
    resolve_precision,
    save_lora_adapters,
    save_merged,
    set_trainable,
    trainable_parameters,
    trainable_state_dict,
)
from flythinker.training.trainer import FlyThinkerTrainer

TOK = char_tokenizer()
COLLATE = FlyThinkerCollator(tokenizer=TOK)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: one intra-op thread is faster, and far faster when the CPUs are shared (measured here under
    # load 10 on 2 cores: 0.05 s vs 0.5-4 s per forward+backward).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_pair(lam=0.5, projection="pad", seed=0, tie_reasoner=True, **fusion):
    torch.manual_seed(seed)
    g = AutoModelForCausalLM.from_config(tiny_config(hidden_size=64))
    r = AutoModelForCausalLM.from_config(tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                                     tie_word_embeddings=tie_reasoner))
    return FlyThinkerForCausalLM.from_pair(g, r, fusion_lambda=lam, projection=projection, **fusion)


def fit(model, data, steps, lr=3e-3, batch=8, seed=0):
    """Plain AdamW loop (weight decay 0) over the trainable parameters; returns the loss of each step."""
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g).tolist()
        loss = model(**COLLATE([data[i] for i in idx])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def heldout_loss(model, data):
    model.eval()
    return model(**COLLATE(data)).loss.item()


def grads(model, prefix):
    return {n: p.grad for n, p in model.named_parameters() if n.removeprefix("model.").startswith(prefix)}


# ---- selection ------------------------------------------------------------------------------------------------
def test_parse_parts():
    assert parse_parts("both") == {"generator", "reasoner", "projection"}
    assert parse_parts("generator,projection") == {"generator", "projection"}
    assert parse_parts({"reasoner"}) == {"reasoner"}
    with pytest.raises(ValueError, match="unknown trainable part"):
        parse_parts("decoder")
    with pytest.raises(ValueError, match="no parameters"):
        set_trainable(tiny_pair(projection="pad"), "projection")  # "pad" has no parameters


@pytest.mark.parametrize("train", ["generator", "reasoner", "projection", "generator,projection"])
def test_frozen_parts_get_no_grad(train):
    model = tiny_pair(projection="linear")
    parts = parse_parts(train)
    counts = set_trainable(model, train)
    assert all((counts[p] > 0) == (p in parts) for p in counts)
    model.train()
    model(**COLLATE(reverse_task(4))).loss.backward()
    for name, p in model.named_parameters():
        name = name.removeprefix("model.")  # the pair's parts live under the fused model
        part = "generator" if name.startswith("generator.") else "reasoner" if name.startswith("reasoner.") else \
            "projection"
        if part in parts:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # at least one trained tensor has a non-zero gradient
    assert any(p.grad.abs().sum() > 0 for p in trainable_parameters(model))


def test_untied_reasoner_head_is_never_trained():
    model = tiny_pair(tie_reasoner=False)
    set_trainable(model, "both")
    assert not model.reasoner.get_output_embeddings().weight.requires_grad  # it never runs
    assert model.reasoner.get_input_embeddings().weight.requires_grad


# ---- learning -------------------------------------------------------------------------------------------------
def test_training_lowers_heldout_loss():
    model = tiny_pair()
    train, held = reverse_task(256, seed=0), reverse_task(32, seed=1)
    before = heldout_loss(model, held)
    fit(model, train, steps=40)
    after = heldout_loss(model, held)
    assert after < 0.7 * before, (before, after)


def test_lambda_zero_reasoner_gets_zero_gradient_and_does_not_move():
    """With lambda = 0 the fused term is multiplied by 0: autograd still reaches the reasoner (its graph runs) but
    every gradient is exactly 0. With AdamW and weight decay 0 the reasoner weights therefore stay bit-identical.
    (The CLI freezes the reasoner instead when lambda = 0: no wasted backward, no optimizer state.)"""
    model = tiny_pair(lam=0.0)
    set_trainable(model, "both")
    model.train()
    model(**COLLATE(reverse_task(4))).loss.backward()
    r = grads(model, "reasoner.")
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in r.values())
    assert any(torch.count_nonzero(g) > 0 for g in grads(model, "generator.").values())
    rsn_before = copy.deepcopy(model.reasoner.state_dict())
    fit(model, reverse_task(32), steps=3)
    for k, v in model.reasoner.state_dict().items():
        assert torch.equal(v, rsn_before[k]), k
    # lambda = 0 is the plain generator: same loss as the HF model's own
    batch = COLLATE(reverse_task(4, seed=3))
    model.eval()
    with torch.no_grad():
        ours = model(**batch).loss
        plain = model.generator(**batch | {"position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)}).loss
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


def test_reasoner_latents_carry_split_context_information():
    """Split context: only the reasoner sees the key. Trained jointly with lambda > 0 the generator learns to write
    the keyed word; with lambda = 0 it can only guess among 4 words (loss floor ~ ln 4 / len(word))."""
    train, held = secret_task(256, seed=0), secret_task(32, seed=1)
    result = {}
    for lam in (0.0, 1.0):
        model = tiny_pair(lam=lam)
        set_trainable(model, "both")
        fit(model, train, steps=60, lr=5e-3)
        result[lam] = heldout_loss(model, held)
    assert result[1.0] < 0.6 * result[0.0], result


# ---- optimizer state under HF Trainer ---------------------------------------------------------------------------
def _trainer(model, tmp_path, steps=3, **kw):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, learning_rate=3e-3,
              logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
              disable_tqdm=True, seed=0) | kw
    args = TrainingArguments(**kw)
    return FlyThinkerTrainer(model=model, args=args, train_dataset=reverse_task(32), data_collator=COLLATE,
                             processing_class=TOK)


def test_trainer_optimizer_state_only_for_trainable(tmp_path):
    model = tiny_pair(projection="linear")
    set_trainable(model, "reasoner,projection")
    trainer = _trainer(model, tmp_path)
    gen_before = copy.deepcopy(model.generator.state_dict())
    trainer.train()
    opt = trainer.optimizer
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    with_state = {id(p) for p in opt.state}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable and with_state == trainable
    assert all(torch.equal(v, gen_before[k]) for k, v in model.generator.state_dict().items())


def test_trainer_end_to_end_checkpoint_reloads(tmp_path):
    model = tiny_pair()
    trainer = _trainer(model, tmp_path, steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # Trainer passes num_items_in_batch to the model
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    trainer.save_model(str(tmp_path / "final"))
    batch = COLLATE(reverse_task(3, seed=5))
    model.eval()
    with torch.no_grad():
        want = model(**batch).loss
        for folder in (tmp_path / "final", tmp_path / "checkpoint-4"):
            assert (folder / "model.safetensors").is_file()
            loaded = FlyThinkerForCausalLM.from_pretrained(folder).eval()
            torch.testing.assert_close(loaded(**batch).loss, want, rtol=1e-6, atol=1e-6)


def test_gradient_accumulation_matches_big_batch(tmp_path):
    """num_items_in_batch: batch 2 x 2 accumulation steps gives the same updates as batch 4 (token-level mean over
    the accumulated batch, although the micro-batches hold different numbers of response tokens)."""
    curves = []
    for bs, ga in ((4, 1), (2, 2)):
        model = tiny_pair()
        args = TrainingArguments(output_dir=str(tmp_path / f"{bs}"), per_device_train_batch_size=bs,
                                 gradient_accumulation_steps=ga, max_steps=3, learning_rate=3e-3, logging_steps=1,
                                 save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
                                 disable_tqdm=True, seed=0, data_seed=0)
        trainer = FlyThinkerTrainer(model=model, args=args, train_dataset=reverse_task(32), data_collator=COLLATE)
        trainer.train()
        curves.append([e["loss"] for e in trainer.state.log_history if "loss" in e])
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]), rtol=1e-4, atol=1e-5)


# ---- LoRA -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", ["generator", "reasoner"])
def test_lora_trains_saves_and_loads(part, tmp_path):
    model = tiny_pair()
    base = copy.deepcopy(model)
    apply_lora(model, part, r=4, alpha=8)
    counts = set_trainable(model, "both")
    other = "reasoner" if part == "generator" else "generator"
    assert counts[part] > 0 and counts[other] > 0  # the LoRA'd part trains adapters only, the other one fully
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters()
               if n.removeprefix("model.").startswith(part + "."))
    fit(model, reverse_task(64), steps=5)
    # base weights of the LoRA'd part did not move; its adapters did
    lora_b = [p for n, p in model.named_parameters()
              if n.removeprefix("model.").startswith(part + ".") and "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    sd = merged_state_dict(model)
    assert set(sd) == set(base.state_dict())  # plain FlyThinker keys
    batch = COLLATE(reverse_task(3, seed=9))
    model.eval()
    with torch.no_grad():
        want = model(**batch).loss
        save_merged(model, tmp_path / "merged", tokenizer=TOK)
        merged = FlyThinkerForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(merged(**batch).loss, want, rtol=1e-5, atol=1e-6)
        # adapters only, loaded into a fresh copy of the base pair
        save_lora_adapters(model, tmp_path / "adapters")
        assert (tmp_path / "adapters" / part / "adapter_model.safetensors").is_file()
        base.load_state_dict({k: v for k, v in sd.items() if not k.removeprefix("model.").startswith(part + ".")},
                            strict=False)
        load_lora_adapters(base, tmp_path / "adapters")
        torch.testing.assert_close(base.eval()(**batch).loss, want, rtol=1e-5, atol=1e-6)
        # merging in place removes the LoRA layers and keeps the function
        merge_lora(model)
        assert not any("lora_" in k for k in model.state_dict()) and set(model.state_dict()) == set(sd)
        torch.testing.assert_close(model(**batch).loss, want, rtol=1e-5, atol=1e-6)


def test_lora_errors():
    model = tiny_pair()
    with pytest.raises(ValueError, match="not found"):
        apply_lora(model, "generator", target_modules=["c_attn"])
    apply_lora(model, "generator")
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, "generator")


# ---- gradient checkpointing and precision -------------------------------------------------------------------------
def test_gradient_checkpointing_same_loss_and_grads():
    batch = COLLATE(secret_task(4))
    out = []
    for ckpt in (False, True):
        model = tiny_pair(projection="linear")
        if ckpt:
            enable_gradient_checkpointing(model)
            assert model.generator.model.gradient_checkpointing and model.reasoner.model.gradient_checkpointing
        model.train()
        loss = model(**batch).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=0)
    assert out[0][1].keys() == out[1][1].keys() and any(k.startswith("model.reasoner.") for k in out[0][1])
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=1e-5, atol=1e-7)


def test_hf_gradient_checkpointing_enable_reaches_both_models():
    model = tiny_pair()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for sub in (model.generator, model.reasoner):
        assert all(layer.gradient_checkpointing for layer in sub.model.layers)


def test_precision_resolution_and_cpu_autocast():
    assert resolve_precision("auto", "cpu") == torch.float32  # documented: CPU stays fp32 unless asked
    assert resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")
    model = tiny_pair()
    batch = COLLATE(reverse_task(4))
    with torch.no_grad():
        ref = model(**batch).loss
        with autocast("bf16", "cpu"):
            low = model(**batch).loss
    assert torch.isfinite(low) and abs(low.item() - ref.item()) < 0.05 * ref.item()


def _ragged_split(n, seed):
    return [{"generator_prompt": "say" + "!" * i, "reasoner_prompt": "key=" + "k" * (3 * (n - i)),
             "response": "ab" * (i + 1)} for i in range(n)]


@pytest.mark.parametrize("task", [reverse_task, _ragged_split])
def test_left_and_right_padding_give_the_same_loss(task):
    """The collator's padding side is free: the model takes positions from the mask and aligns split context
    from each row's last real token, so both sides give the same loss (rows of different lengths)."""
    model = tiny_pair(projection="linear").eval()
    data = task(6, seed=2)
    with torch.no_grad():
        losses = [model(**FlyThinkerCollator(tokenizer=TOK, padding_side=side)(data)).loss for side in ("left",
                                                                                                      "right")]
    batch = FlyThinkerCollator(tokenizer=TOK)(data)
    assert all(m.min() == 0 for k, m in batch.items() if k.endswith("attention_mask"))  # there is padding
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


# ---- the shared small loop (training.loop) ---------------------------------------------------------------------
def benchmark_loop_before_issue_11(model, feats, steps, batch, lr, reasoner_lr_scale, seed):
    """benchmarks/personalization.py's own loop as it was (the oracle for reproducibility)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rsn = {id(p) for p in model.reasoner.parameters()}
    groups = [{"params": [p for p in params if id(p) not in rsn], "lr": lr},
              {"params": [p for p in params if id(p) in rsn], "lr": lr * reasoner_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01, betas=(0.9, 0.98))
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)  # the loop's schedule: transformers'
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
    benchmarks/personalization.py had (with transformers' warm-up + cosine schedule, which replaced its own)."""
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


def test_the_schedule_is_transformers_cosine_with_warmup(monkeypatch):
    """Every step's learning rate, per group: transformers' get_cosine_schedule_with_warmup (as HF Trainer runs
    it), so step 0 runs at lr 0, step `warmup_steps` at the peak, and the last step just above 0."""
    used = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        used.append([g["lr"] for g in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    model = tiny_pair(projection="linear")
    steps, warm, lr = 10, 4, 1e-2
    train_loop(model, secret_task(8), COLLATE, steps=steps, batch_size=2, lr=lr, reasoner_lr=lr / 2,
               warmup_steps=warm)
    factors = [0.0, 0.25, 0.5, 0.75, 1.0] + [0.5 * (1 + math.cos(math.pi * k / (steps - warm))) for k in
                                             range(1, steps - warm)]
    parts = [g["part"] for g in param_groups(model, lr, reasoner_lr=lr / 2)]
    peak = {"generator": lr, "projection": lr, "reasoner": lr / 2}
    assert len(used) == steps and parts == ["generator", "projection", "reasoner"]
    for got, f in zip(used, factors, strict=True):
        assert got == pytest.approx([peak[p] * f for p in parts], rel=1e-12, abs=0)
    assert used[0] == [0.0, 0.0, 0.0]  # the first step does not move the weights
    assert used[warm] == [lr, lr, lr / 2]
    assert 0 < used[-1][0] < 0.07 * lr  # 0.5 * (1 + cos(5 pi / 6)) = 0.067: 0 is reached after the last step


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
    model = tiny_pair()  # 2 layers each
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(model, "generator", r=4, alpha=8, target_modules=targets)
    apply_lora(model, "reasoner", r=4, alpha=8, target_modules=targets, layers=[1])
    set_trainable(model, ("generator", "reasoner"))
    assert set(lora_parts(model)) == {"generator", "reasoner"}
    state = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    assert state and all(".lora_" in k for k in state)
    r_layers = {k.split(".layers.")[1].split(".")[0] for k in state if k.startswith("model.reasoner.")}
    g_layers = {k.split(".layers.")[1].split(".")[0] for k in state if k.startswith("model.generator.")}
    assert r_layers == {"1"} and g_layers == {"0", "1"}
    train_loop(model, secret_task(16), COLLATE, steps=3, batch_size=4, lr=1e-2)
    after = trainable_state_dict(model)
    assert any(not torch.equal(after[k], v) for k, v in state.items() if "lora_B" in k)
    assert after[next(iter(after))].data_ptr() == dict(model.named_parameters())[next(iter(after))].data_ptr()
    merged = merged_state_dict(model)
    assert not any("lora_" in k for k in merged) and "model.generator.model.layers.0.mlp.up_proj.weight" in merged
