"""The base/head split: `FlyThinkerModel` gives the fused generator states, `FlyThinkerForCausalLM` adds the LM head
and the loss; checkpoints keep their flat layout; TRL's fused LM head works on the pair, Liger is refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flythinker import FlyThinkerForCausalLM
from flythinker.modeling import LIGER_REFUSAL, FlyThinkerModel
from tests.model_helpers import random_ids, split_inputs, tiny_pair


def _keys(folder) -> list[str]:
    with open(folder / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return sorted(k for k in json.loads(f.read(n)) if k != "__metadata__")


def test_base_model_and_decoder_give_the_fused_states_the_head_reads():
    pair = tiny_pair(projection="linear")
    assert isinstance(pair.model, FlyThinkerModel)
    assert pair.base_model is pair.model and pair.get_decoder() is pair.model
    ids, mask, extra = split_inputs(3, True)
    with torch.no_grad():
        hidden = pair.model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).last_hidden_state
        logits = pair(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        plain = pair.generator.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(pair.get_output_embeddings()(hidden), logits)
    assert hidden.shape == plain.shape and not torch.allclose(hidden[:, -1], plain[:, -1])  # the latent is in it


def test_checkpoint_keeps_the_flat_layout_and_an_old_layout_folder_loads(tmp_path):
    pair = tiny_pair(projection="linear", latent_norm="standardize")
    with torch.no_grad():
        pair.latent_mean.normal_()
    pair.save_pretrained(tmp_path / "saved")
    flat = sorted(pair.model.state_dict())  # the pair's parts without the `model.` prefix
    keys = _keys(tmp_path / "saved")
    assert keys and all(not k.startswith("model.") for k in keys) and set(keys) <= set(flat)
    assert {"latent_proj.weight", "latent_mean", "latent_inv_std"} <= set(keys)
    # a folder written by hand in the flat layout (what every checkpoint before the split holds)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    state = pair.model.state_dict()  # tied heads are written once, as transformers writes them
    save_file({k: state[k].clone() for k in keys}, old / "model.safetensors", metadata={"format": "pt"})
    ids = random_ids(2, 7)
    for folder in (tmp_path / "saved", old):
        again = FlyThinkerForCausalLM.from_pretrained(folder).eval()
        for k, v in pair.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
        with torch.no_grad():
            torch.testing.assert_close(again(ids, use_cache=False).logits, pair(ids, use_cache=False).logits)


def test_a_missing_tensor_is_named_as_in_the_checkpoint(tmp_path):
    from flythinker.checkpoint import CheckpointError

    pair = tiny_pair(projection="linear")
    pair.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    del state["latent_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"latent_proj\.weight") as info:
        FlyThinkerForCausalLM.from_pretrained(tmp_path)
    assert "model.latent_proj" not in str(info.value)


def test_trl_fused_lm_head_reads_the_fused_states():
    from trl.trainer.utils import add_fused_lm_head

    pair = tiny_pair(projection="linear")
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logits = pair(ids, use_cache=False).logits
    add_fused_lm_head(pair)
    with torch.no_grad():
        out = pair(input_ids=ids, labels=labels, fused_lm_head=True)
    want = torch.gather(F.log_softmax(logits[:, :-1].float(), -1), -1, ids[:, 1:, None])[..., 0]
    want = want.masked_fill(labels[:, 1:] == -100, 0)
    torch.testing.assert_close(out.log_probs, want, rtol=1e-4, atol=1e-4)


def test_liger_kernel_is_refused_naming_what_is_missing(tmp_path):
    from transformers import TrainingArguments

    from flythinker.training.trainer import FlyThinkerTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    object.__setattr__(args, "use_liger_kernel", True)  # liger_kernel need not be installed to be refused
    with pytest.raises(ValueError, match="model_type 'flythinker'") as info:
        FlyThinkerTrainer(model=tiny_pair(), args=args)
    assert info.value.args[0] == LIGER_REFUSAL


def test_load_state_dict_takes_the_saved_files_flat_names(tmp_path):
    """Trainer's resume hands `model.safetensors` (flat checkpoint names) to `load_state_dict` non-strict: every
    tensor must load, not none of them silently."""
    from safetensors.torch import load_file

    saved = tiny_pair(projection="linear")
    saved.save_pretrained(tmp_path)
    other = tiny_pair(projection="linear", seed=1)
    result = other.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not result.unexpected_keys
    for (name, a), b in zip(saved.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
