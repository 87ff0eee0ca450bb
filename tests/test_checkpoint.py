"""Strict checkpoint loading (flythinker.checkpoint, used by FlyThinkerForCausalLM.from_pretrained and
hub.load_pretrained): what used to load silently on random or dropped weights is refused, naming the problem."""

import json
import time

import pytest
import torch

from flythinker.checkpoint import CheckpointError, check_resumable, latest_checkpoint
from flythinker.modeling import FlyThinkerForCausalLM
from tests.faults import DAMAGES, damaged_copy
from tests.model_helpers import tiny_pair


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tiny_pair(projection="linear").save_pretrained(root / "linear")
    tiny_pair().save_pretrained(root / "pad")
    return root


def test_good_checkpoint_loads_and_matches(saved):
    torch.manual_seed(0)
    model = FlyThinkerForCausalLM.from_pretrained(saved / "linear")
    again, info = FlyThinkerForCausalLM.from_pretrained(saved / "linear", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("damage, names", [
    ("reasoner_stripped", ["missing", "reasoner.model.embed_tokens.weight", "[under: reasoner]"]),
    ("more_layers_in_config", ["missing", "generator.model.layers.2."]),
    ("fewer_layers_in_config", ["extra tensors", "generator.model.layers.1."]),
])
def test_tensors_not_matching_config_are_refused_by_name(saved, tmp_path, damage, names):
    folder = damaged_copy(saved / "pad", damage, tmp_path)
    with pytest.raises(CheckpointError) as info:
        FlyThinkerForCausalLM.from_pretrained(folder)
    assert all(n in str(info.value) for n in names), str(info.value)
    # strict=False is the explicit way to load it anyway; asking for the load report gets it to judge
    FlyThinkerForCausalLM.from_pretrained(folder, strict=False)
    _, report = FlyThinkerForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert report["missing_keys"] or report["unexpected_keys"]
    with pytest.raises(CheckpointError):
        FlyThinkerForCausalLM.from_pretrained(folder, output_loading_info=True, strict=True)


def test_projection_override_of_a_trained_projection_is_refused(saved):
    with pytest.raises(CheckpointError, match="saved with projection='linear'; projection='pad' cannot"):
        FlyThinkerForCausalLM.from_pretrained(saved / "linear", projection="pad")
    with pytest.raises(CheckpointError, match="saved with projection='pad'"):
        FlyThinkerForCausalLM.from_pretrained(saved / "pad", projection="linear")


def test_missing_local_path_fails_at_once_naming_it(tmp_path):
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="no such checkpoint folder: runs/ckpt"):
        FlyThinkerForCausalLM.from_pretrained("runs/ckpt")  # used to retry a model hub for 46 s
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("damage", ["index_outside_folder", "config_empty", "truncated_safetensors",
                                    "corrupt_safetensors", "config_a_list", "no_model_type", "pickled_only"])
def test_damaged_folders_are_refused(saved, tmp_path, damage):
    folder = damaged_copy(saved / "pad", damage, tmp_path)
    with pytest.raises(CheckpointError, match=DAMAGES[damage][1]):
        FlyThinkerForCausalLM.from_pretrained(folder)


def test_plain_model_folder_is_strict_too(tmp_path):
    from flythinker.hub import load_pretrained
    from flythinker.training.toy import save_tiny_model

    good = save_tiny_model(tmp_path / "plain", seed=0, hidden_size=32)
    folder = damaged_copy(good, "index_outside_folder", tmp_path)
    with pytest.raises(CheckpointError, match="points outside its folder"):
        load_pretrained(folder, with_tokenizer=False)
    config = json.loads((good / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing .* model.layers.2"):
        load_pretrained(good, with_tokenizer=False)


def test_half_written_training_checkpoint_is_not_resumable(saved, tmp_path):
    import shutil

    run = tmp_path / "run"
    for step in (2, 4):
        shutil.copytree(saved / "pad", run / f"checkpoint-{step}")
        for name in ("optimizer.safetensors", "optimizer.json", "scheduler.json"):
            (run / f"checkpoint-{step}" / name).write_bytes(b"x")
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (run / "checkpoint-4" / "optimizer.safetensors").write_bytes(b"")  # what a kill mid-save left, before atomic saves
    with pytest.raises(CheckpointError, match="optimizer.safetensors is empty"):
        check_resumable(run / "checkpoint-4")
    path, skipped = latest_checkpoint(run)
    assert path == run / "checkpoint-2" and [p.name for p, _ in skipped] == ["checkpoint-4"]
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path / "nothing")
