"""Smoke test of benchmarks/personalization.py on a toy budget: it runs end to end and writes its results,
and the lambda = 0 pair trains exactly like the generator alone (same init, same batches)."""

import json

import pytest

from benchmarks.personalization import main


def test_benchmark_smoke(tmp_path):
    stem = tmp_path / "pers"
    res = main(["--quick", "--variants", "a_query_sft,c_split,e_lambda0", "--n-users", "6", "--steps", "3",
                "--batch", "4", "--n-test", "4", "--gen-hidden", "32", "--rsn-hidden", "32", "--layers", "1",
                "--out", str(stem)])
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".png").stat().st_size > 0
    assert set(saved["variants"]) == {"a_query_sft", "c_split", "e_lambda0"}
    for v in saved["variants"].values():
        for key in ("strategy_accuracy", "rouge_l", "nll", "generator_tokens"):
            assert isinstance(v[key], float)
    a, c, e = (res["variants"][k] for k in ("a_query_sft", "c_split", "e_lambda0"))
    assert c["generator_tokens"] == a["generator_tokens"] < c["reasoner_tokens"]
    # fusion off: the generator sees exactly what generator-only SFT sees
    assert e["nll"] == pytest.approx(a["nll"], rel=1e-4)
    assert e["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)
    assert [s["output"] for s in e["samples"]] == [s["output"] for s in a["samples"]]
    assert c["nll"] != pytest.approx(a["nll"], rel=1e-4)
