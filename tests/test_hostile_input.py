"""Hostile but realistic input, library side: judges that cannot judge, shipped-pair and checkpoint loaders given
incomplete or non-finite artefacts, names that are also local folders, run folders with two writers, record files
nested too deeply, and the file modes of atomic writes. The command-line side is in tests/test_cli_errors.py, the
server side in tests/vllm_serving/ (test_serve.py's fuzz test)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from flythinker.empathy import CallableJudgeBackend, EmpathyJudge, JudgeBackend, JudgeContext, get_rubric
from tests.faults import SHIPPED_DAMAGES, shipped_copy

SHIPPED = "smollm2-135m-persona-empathy"
CTX = JudgeContext(query="My dog died yesterday and I can't stop crying.", persona="Quiet; values honesty.")


# ---- judges ---------------------------------------------------------------------------------------------------------
def test_rl_judge_reward_reads_the_reply_not_an_empty_analysis():
    """`flythinker rl --reward perm`: the policy writes plain replies, so resonation must judge the reply (it
    used to judge the string "(empty)": gibberish and an empathic reply got the same resonation)."""
    from flythinker.cli import build_parser
    from flythinker.cli.rl import _reward_funcs

    args = build_parser().parse_args(["rl", "--reward", "perm", "--judge-base-url", "http://127.0.0.1:9/v1",
                                      "--out", "unused"])
    (reward,), _ = _reward_funcs(args)
    judge = reward.judge
    assert all(d.reads != "analysis" for d in judge.rubric.dimensions)
    seen = []

    def fn(messages):
        text = messages[-1]["content"]
        seen.append(text)
        return "Score: 5" if "sorry" in text.lower() else "Score: 1"

    judge.backend = CallableJudgeBackend(fn)
    judge.use_bystander = False
    kind, junk = judge.score(["I'm so sorry about Rex.", "asdf qwerty 12345 buy crypto now"], [CTX, CTX])
    assert kind.scores["resonation"] == 5 and junk.scores["resonation"] == 1
    assert kind.reward > junk.reward
    assert not any("(empty)" in t for t in seen)


def test_judge_refuses_an_analysis_rubric_on_plain_replies():
    with pytest.raises(ValueError, match="analysis"):
        EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(lambda m: "Score: 3"))
    EmpathyJudge(get_rubric("perm"), CallableJudgeBackend(lambda m: "Score: 3"), policy_format="analysis_response")


class _FixedMass(JudgeBackend):
    """Expected-mode backend whose score tokens hold `mass` of the probability (value 4 on them)."""

    name, model_name = "fixed", "fixed"

    def __init__(self, mass: float):
        self.mass = mass

    def expected_scores(self, prompts):
        return [(4.0, self.mass) for _ in prompts]


def test_expected_mode_counts_a_sliver_of_score_mass_as_a_failure():
    """0.09% of the probability on the score tokens (the default local judge on PERM prompts) is not a score."""
    rubric = get_rubric("perm", analysis=False)
    low = EmpathyJudge(rubric, _FixedMass(0.0009), mode="expected")
    (r,) = low.score(["I'm so sorry."], [CTX])
    assert r.reward is None and r.scores["expression"] is None
    assert "0.09%" in r.failures["expression"]
    assert low.report()["low_mass_failures"] == 4
    ok = EmpathyJudge(rubric, _FixedMass(0.6), mode="expected")
    (r,) = ok.score(["I'm so sorry."], [CTX])
    assert r.scores["expression"] == 4.0 and r.reward is not None
    assert EmpathyJudge(rubric, _FixedMass(0.0009), mode="expected", min_score_mass=0.0).score(
        ["x"], [CTX])[0].reward is not None  # the threshold is the caller's to lower


@pytest.mark.parametrize("kwargs,match", [
    ({"fallback": {"dimension": float("nan")}}, "fallback"),
    ({"fallback": {"dimension": 7.0}}, "fallback"),
    ({"fallback": {"bystander": -1.0}}, "fallback"),
    ({"min_score_mass": 2.0}, "min_score_mass"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_judge_numbers_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmpathyJudge(get_rubric("perm", analysis=False), CallableJudgeBackend(lambda m: "Score: 3"), **kwargs)


@pytest.mark.parametrize("coef", [float("nan"), float("inf"), -3.0])
def test_bystander_coef_must_be_finite_and_non_negative(coef):
    with pytest.raises(ValueError, match="bystander_coef"):
        get_rubric("perm", bystander_coef=coef)


# ---- shipped pairs --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", sorted(k for k, v in SHIPPED_DAMAGES.items() if v[2]))
def test_shipped_pair_manifest_and_tensors_checked_before_loading(tmp_path, damage):
    """pair.json's building fields and the deltas' finiteness are checked before the base model loads."""
    from flythinker.pretrained.loading import read_deltas

    folder = shipped_copy(SHIPPED, damage, tmp_path)
    with pytest.raises(ValueError, match=SHIPPED_DAMAGES[damage][1]) as err:
        read_deltas(SHIPPED, folder)
    assert SHIPPED in str(err.value)


@pytest.mark.parametrize("damage", sorted(k for k, v in SHIPPED_DAMAGES.items() if not v[2]))
def test_shipped_pair_incomplete_deltas_refused(tmp_path, damage):
    """Deltas missing the projection or one layer's LoRA factors would load as a different model (a zero
    projection: no personalisation at all)."""
    from flythinker.pretrained.loading import from_shipped

    folder = shipped_copy(SHIPPED, damage, tmp_path)
    with pytest.raises(ValueError, match=SHIPPED_DAMAGES[damage][1].replace("[", r"\[").replace("]", r"\]")):
        from_shipped(SHIPPED, folder=folder)


def test_shared_base_must_be_a_bool():
    from flythinker import FlyThinkerForCausalLM

    with pytest.raises(TypeError, match="shared_base"):
        FlyThinkerForCausalLM.from_pretrained(SHIPPED, shared_base="no")


def test_local_folder_of_a_shipped_name_is_that_folder(tmp_path, monkeypatch):
    """One rule for a name that is both a shipped pair and a folder here: the folder (from_pretrained used to
    return the shipped pair while `generate --model` loaded the folder)."""
    from flythinker import FlyThinkerForCausalLM
    from flythinker.pretrained import shipped_name
    from flythinker.training.toy import save_tiny_model

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=64)
    save_tiny_model(tmp_path / "rsn", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    FlyThinkerForCausalLM.from_pair(str(tmp_path / "gen"), str(tmp_path / "rsn"),
                                    projection="pad").save_pretrained(tmp_path / SHIPPED)
    monkeypatch.chdir(tmp_path)
    assert shipped_name(SHIPPED) is None and shipped_name(SHIPPED.upper()) == SHIPPED
    model = FlyThinkerForCausalLM.from_pretrained(SHIPPED)
    assert model.config.generator.hidden_size == 64  # the tiny local pair, not the shipped SmolLM2 one (576)


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def test_checkpoint_with_a_nan_tensor_is_refused(tmp_path):
    from flythinker import FlyThinkerForCausalLM
    from flythinker.checkpoint import CheckpointError
    from flythinker.training.toy import save_tiny_model
    from tests.faults import damaged_copy

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=64)
    FlyThinkerForCausalLM.from_pair(str(tmp_path / "gen"), str(tmp_path / "gen"), projection="linear"
                                    ).save_pretrained(tmp_path / "pair")
    bad = damaged_copy(tmp_path / "pair", "nan_tensor", tmp_path)
    with pytest.raises(CheckpointError, match="non-finite values"):
        FlyThinkerForCausalLM.from_pretrained(bad)
    assert torch.isfinite(FlyThinkerForCausalLM.from_pretrained(tmp_path / "pair").latent_proj.weight).all()


# ---- record files ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[" * 100_000, '{"a": ' * 50_000, '{"a": 1}\n' + "[" * 100_000])
def test_deeply_nested_json_is_a_data_error(tmp_path, text):
    from flythinker.persona.jsonio import JsonFileError, read_json_items

    path = tmp_path / "deep.json"
    path.write_text(text)
    with pytest.raises(JsonFileError, match="nested too deeply"):
        read_json_items(path)


# ---- run folders ----------------------------------------------------------------------------------------------------
def test_run_folder_one_writer_and_no_silent_reuse(tmp_path):
    from flythinker.run_folder import RunFolderError, output_file, run_folder

    out = tmp_path / "run"
    with run_folder(out) as folder:
        (folder / "model.safetensors").write_bytes(b"x")
        with pytest.raises(RunFolderError, match="another flythinker process"), run_folder(out, resume=True):
            pass
    with pytest.raises(RunFolderError, match="already holds a run"), run_folder(out):
        pass
    with run_folder(out, resume=True), run_folder(tmp_path / "other"):
        pass  # held folders are independent
    with run_folder(out, overwrite=True):
        pass
    with pytest.raises(RunFolderError, match="contradict"), run_folder(out, resume=True, overwrite=True):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="existing file"), run_folder(tmp_path / "file"):
        pass
    with pytest.raises(RunFolderError, match="already exists"), output_file(tmp_path / "file"):
        pass
    with pytest.raises(RunFolderError, match="is a folder"), output_file(out):
        pass
    with output_file(tmp_path / "file", overwrite=True) as fh:
        fh.write_bytes(b"new")
    assert (tmp_path / "file").read_bytes() == b"new"


def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    from tests.faults import run_child

    out = tmp_path / "run"
    from flythinker.run_folder import run_folder

    with run_folder(out):
        proc = run_child("from flythinker.run_folder import run_folder\n"
                         f"with run_folder({str(out)!r}, resume=True):\n    pass\n", check=False)
    assert proc.returncode != 0 and "another flythinker process" in proc.stderr
    proc = run_child(f"from flythinker.run_folder import run_folder\nwith run_folder({str(out)!r}):\n    pass\n")
    assert proc.returncode == 0  # released with the first holder


def test_atomic_writes_respect_the_umask(tmp_path):
    from flythinker.hub import atomic_directory, atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    json.loads((tmp_path / "a.json").read_text())


def test_train_refused_while_another_run_holds_its_output_dir(tmp_path, capsys):
    """Two `flythinker train` into one --output-dir: the second is refused at once (both used to exit 0, the
    first run's model gone and train_log.jsonl interleaved)."""
    from flythinker.cli import main
    from flythinker.run_folder import run_folder
    from flythinker.training.toy import save_tiny_model, secret_task

    save_tiny_model(tmp_path / "gen", seed=0, hidden_size=64)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in secret_task(8)))
    out = tmp_path / "out"
    argv = ["train", "--generator", str(tmp_path / "gen"), "--data", str(tmp_path / "data.jsonl"), "--output-dir",
            str(out), "--max-steps", "1", "--no-progress"]
    with run_folder(out):  # the first run, still writing
        assert main(argv) == 2
        assert "another flythinker process" in capsys.readouterr().err
    assert main(argv) == 0 and (out / "config.json").is_file()
    assert main(argv) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_generate_record_note_names_a_cut_profile(tmp_path):
    """A record whose persona profile alone overflows the reasoner budget: the note says what was cut (it said
    "dropped 0 oldest turns")."""
    from flythinker.cli import build_parser
    from flythinker.cli.generate import _record_prompts
    from flythinker.persona import make_persona_empathy
    from flythinker.training.toy import char_tokenizer

    rec = make_persona_empathy(n_users=3, queries_per_user=1)["train"][0].to_dict()
    rec.update(history=[], persona={**rec["persona"], "profile": "likes quiet walks by the sea " * 200})
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    args = build_parser().parse_args(["generate", "--generator", "x", "--record", str(tmp_path / "rec.json"),
                                      "--max-reasoner-tokens", "600"])
    note = _record_prompts(args, char_tokenizer()).description
    assert "persona words" in note and "0 oldest turns" not in note


def test_rl_refuses_to_save_a_run_whose_judge_scored_nothing():
    """With the default local judge every score is a counted failure (0.09% score mass): the run learned nothing
    from the judge, so `flythinker rl` says so instead of saving the model as trained."""
    from types import SimpleNamespace

    from flythinker.cli.common import CLIError
    from flythinker.cli.rl import _check_judges
    from flythinker.rl import JudgeReward

    judge = EmpathyJudge(get_rubric("perm", analysis=False), _FixedMass(0.0009), mode="expected")
    reward = JudgeReward(judge)
    assert reward(["I'm so sorry."], query=[CTX.query]) == [None]
    with pytest.raises(CLIError, match="scored none"):
        _check_judges(SimpleNamespace(reward_funcs=[reward]))
    ok = JudgeReward(EmpathyJudge(get_rubric("perm", analysis=False), _FixedMass(0.6), mode="expected"))
    assert ok(["I'm so sorry."], query=[CTX.query])[0] is not None
    _check_judges(SimpleNamespace(reward_funcs=[ok]))
