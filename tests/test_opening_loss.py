"""The opening-weighted response loss (flythinker.training.opening_loss) and train_loop's `loss_fn`: the weights
are the documented ones, weight 1 is the model's own loss, a larger weight is the weighted mean computed by hand, a
split pair's batch works, the loop trains on it, and bad arguments are refused."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flythinker.configuration import IGNORE_INDEX
from flythinker.modeling import FlyThinkerForCausalLM
from flythinker.training import FlyThinkerCollator, train_loop
from flythinker.training.opening_loss import opening_weighted_loss, opening_weights
from flythinker.training.toy import char_tokenizer, secret_task, tiny_config

TOK = char_tokenizer()
COLLATE = FlyThinkerCollator(tokenizer=TOK)
X = IGNORE_INDEX


def test_weights_count_the_opening_per_row():
    labels = torch.tensor([[X, X, 5, 6, 7, 8, X],   # prompt, 4 response tokens, padding
                           [X, 9, 9, X, X, X, X]])  # a 2-token response: all of it is the opening
    targets, w = opening_weights(labels, opening_tokens=2, weight=3.0)
    assert targets.tolist() == [[X, 5, 6, 7, 8, X, X], [9, 9, X, X, X, X, X]]  # position t predicts labels[t + 1]
    assert w.tolist() == [[0, 3, 3, 1, 1, 0, 0], [3, 3, 0, 0, 0, 0, 0]]


def pair(lam=1.0, seed=0):
    torch.manual_seed(seed)
    g = AutoModelForCausalLM.from_config(tiny_config(hidden_size=64))
    r = AutoModelForCausalLM.from_config(tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    return FlyThinkerForCausalLM.from_pair(g, r, fusion_lambda=lam, projection="linear", loss_impl="naive")


def test_weight_one_is_the_models_loss_and_more_is_the_weighted_mean():
    model = pair().eval()
    batch = COLLATE(secret_task(6, seed=3)[:6])
    own = model(**batch, use_cache=False).loss
    assert torch.allclose(opening_weighted_loss(3, 1.0)(model, batch), own, rtol=1e-5, atol=1e-6)

    logits = model(**batch, use_cache=False).logits.float()
    lab = batch["labels"]
    num = den = 0.0
    for b in range(lab.shape[0]):  # by hand: the first 3 labelled next tokens of each row weigh 4
        seen = 0
        for t in range(lab.shape[1] - 1):
            if lab[b, t + 1] == X:
                continue
            seen += 1
            wt = 4.0 if seen <= 3 else 1.0
            num += wt * float(torch.nn.functional.cross_entropy(logits[b, t], lab[b, t + 1]))
            den += wt
    got = opening_weighted_loss(3, 4.0)(model, batch)
    assert got.item() == pytest.approx(num / den, rel=1e-5)
    assert abs(got.item() - own.item()) > 1e-4  # the weighting changes the loss


def test_train_loop_trains_on_the_given_loss():
    model = pair()
    calls = []
    inner = opening_weighted_loss(2, 5.0)

    def loss_fn(m, batch):
        calls.append(batch["input_ids"].shape[0])
        return inner(m, batch)

    before = model.latent_proj.weight.detach().clone()
    res = train_loop(model, secret_task(16), COLLATE, steps=4, batch_size=4, lr=1e-2, loss_fn=loss_fn)
    assert calls == [4] * 4 and len(res.losses) == 4
    assert not torch.equal(before, model.latent_proj.weight)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="opening_tokens >= 1"):
        opening_weighted_loss(0, 2.0)
    with pytest.raises(ValueError, match="weight > 0"):
        opening_weighted_loss(2, 0.0)
    batch = COLLATE(secret_task(2))
    batch.pop("labels")
    with pytest.raises(ValueError, match="needs batch\\['labels'\\]"):
        opening_weighted_loss()(pair(), batch)
    fused = pair()
    fused.config.loss_impl = "fused"
    with pytest.raises(ValueError, match="loss_impl='naive'"):
        opening_weighted_loss()(fused, COLLATE(secret_task(2)))
