"""PersonaEmp's evaluation protocol on the real public session (tests/data/persona_personaemp.json): criteria
sidecar (resumable, atomic), judging a predictions file against it, the summary figure and tables; and
`flythinker judge --predictions` end to end with a local tiny judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flythinker.cli import main
from flythinker.empathy import CallableJudgeBackend, EmpathyJudge, get_rubric, protocol

DATA = Path(__file__).parent / "data" / "persona_personaemp.json"
SCORE = {"resonation": 4, "expression": 3, "reception": 5}


def _judge(calls, fail_after=None, rules="authors"):
    def fn(messages):
        user = messages[-1]["content"]
        calls.append(user)
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("judge went away")
        if "Before any reply is judged" in user:
            return "Specific Criteria:\n1. CRIT-" + user.split("Dimension: ")[1].split(" ")[0] + " (100%): ok"
        dim = next(d for d in SCORE if f"Dimension: {d}" in user)
        if "ZZMARK" in user and dim == "reception":
            return "no score"
        return f"Analysis: fine\nScores: \\boxed{{{SCORE[dim]}}}"

    return EmpathyJudge(get_rubric("peregrm", dynamic_criteria=False, aggregation="mean"), CallableJudgeBackend(fn),
                        rules=rules, role="evaluation")


def test_criteria_sidecar_is_resumable(tmp_path):
    sessions, records = protocol.load_sessions(DATA)
    side = tmp_path / "criteria.json"
    calls = []
    with pytest.raises(RuntimeError, match="went away"):
        protocol.write_criteria(sessions, records, side, _judge(calls, fail_after=7), save_every=4)
    partial = json.loads(side.read_text())  # the first 4 calls were saved, atomically
    assert [c for c in partial[0]["criterias"] if "resonation" in c] and len(calls) == 8
    calls2 = []
    counts = protocol.write_criteria(sessions, records, side, _judge(calls2))
    assert counts == {"written": 15 - 4, "present": 4, "failed": 0} and len(calls2) == 11
    full = json.loads(side.read_text())
    assert full[0]["session_id"] == "english_77" and full[0]["criterias"][4]["query_id"] == "english_77:4"
    assert full[0]["criterias"][2]["reception"] == "1. CRIT-reception (100%): ok"
    # the criteria judge sees memories and query, not the past conversation
    assert "Germany within 1 month" in calls2[0] and "again?" not in calls2[0]
    assert protocol.write_criteria(sessions, records, side, _judge([]))["written"] == 0
    other = [{**sessions[0], "session_id": "english_78"}]
    with pytest.raises(ValueError, match="does not match session"):
        protocol.write_criteria(other, records, side, _judge([]))


def test_evaluate_predictions_report(tmp_path):
    sessions, records = protocol.load_sessions(DATA)
    side = tmp_path / "criteria.json"
    protocol.write_criteria(sessions, records, side, _judge([]))
    pred = tmp_path / "pred.json"
    responses = [{"response": f"reply {j}" + (" ZZMARK" if j == 0 else "")} for j in range(5)]
    responses[3]["response"] = ""
    pred.write_text(json.dumps([{"responses": responses}]))
    crit = protocol.read_criteria(side, records)
    calls = []
    results, rep = protocol.evaluate(records, protocol.read_predictions(pred, sessions, records), crit,
                                     _judge(calls))
    assert any("CRIT-expression" in c and "reply 1" in c for c in calls)
    d = rep["dimensions"]
    assert d["resonation"] == {"n": 4, "unparsed": 1, "mean": 4.0}  # the empty response is not judged
    assert d["reception"] == {"n": 3, "unparsed": 2, "mean": 5.0}  # "no score" left out, as the authors do
    assert rep["overall"] == pytest.approx((4 + 3 + 5) / 3 / 5)
    assert rep["by_category"]["Emotional Support"]["expression"]["n"] == 4
    assert "overall empathy score" in protocol.format_report(rep)
    # query_id/response rows are accepted too; a missing one is an error naming it
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"query_id": r.record_id, "response": "hi"}) + "\n" for r in records[:4]))
    with pytest.raises(ValueError, match="english_77:4"):
        protocol.read_predictions(rows, sessions, records)
    with pytest.raises(ValueError, match="has no criteria"):
        protocol.read_criteria(None, records)


def test_judge_cli_protocol_end_to_end(tmp_path, capsys):
    from flythinker.training.toy import save_tiny_model

    folder = save_tiny_model(tmp_path / "judge", seed=0)
    pred = tmp_path / "pred.json"
    pred.write_text(json.dumps([{"responses": [{"response": "I hear how scared you are."}] * 5}]))
    side, out = tmp_path / "crit.json", tmp_path / "scores.json"
    argv = ["judge", str(DATA), "--predictions", str(pred), "--criteria", str(side), "--judge-model", str(folder),
            "--mode", "generate", "--max-new-tokens", "4", "--limit", "1", "--rules", "authors", "--out", str(out),
            "--overwrite"]
    rc = main(argv)
    first = capsys.readouterr()
    assert "criteria: " in first.out and "written" in first.out
    if rc == 2:  # a random judge may write an empty criterion: counted, left missing, and named
        assert "failed" in first.out and "has no criteria" in first.err
    crit = json.loads(side.read_text())
    assert len(crit[0]["criterias"]) == 5  # the sidecar spans the whole file
    for d in ("resonation", "expression", "reception"):
        crit[0]["criterias"][0].setdefault(d, "1. stays with the fear (100%)")
    side.write_text(json.dumps(crit))
    assert main(argv) == 0  # resumed: nothing left to write for the first query
    text = capsys.readouterr().out
    assert "criteria: 0 written, 3 present" in text and "PersonaEmp's protocol" in text
    assert "overall empathy score" in text
    got = json.loads(out.read_text())
    assert len(got["items"]) == 1 and set(got["report"]["dimensions"]) == {"resonation", "expression", "reception"}
    assert main(["judge", str(DATA), "--predictions", str(pred), "--rubric", "perm"]) == 2
    assert main(["judge", str(DATA), "--criteria", str(side)]) == 2
