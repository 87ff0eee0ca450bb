"""vLLM serving a FlyThinker pair equals `FlyThinkerForCausalLM.generate` (greedy, fp32) on tiny random pairs."""

from __future__ import annotations

import pytest
from conftest import engine, greedy, run_all


def _num_preemptions(llm) -> int:
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def _staggered(llm, prompts: list[list[int]], max_new_tokens: int, every: int = 3) -> list[list[int]]:
    """Submit prompt i at engine step i * every (continuous batching: requests join running batches)."""
    eng = llm.llm_engine
    done: dict[str, list[int]] = {}
    step = 0
    while len(done) < len(prompts):
        for i, p in enumerate(prompts):
            if step == i * every:
                eng.add_request(str(i), {"prompt_token_ids": p}, greedy(max_new_tokens))
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < 10_000
    return [done[str(i)] for i in range(len(prompts))]


def test_pair_matches_hf_staggered_chunked_preempted(suite):
    """lambda = 0.5, Llama generator + Qwen2 reasoner (different widths and KV heads), five prompts of 9..41 tokens
    submitted at different steps; 16-token chunks split every prompt but the first; 4 usable KV blocks of 32 tokens hold
    two requests at most, so the scheduler preempts and recomputes."""
    out, refs = suite
    n = refs["max_new_tokens"]
    with engine(out / "mixed" / "pair", max_num_batched_tokens=16, num_gpu_blocks_override=5,
                disable_log_stats=False) as llm:
        got = _staggered(llm, refs["prompts"], n)
        preempted = _num_preemptions(llm)
    assert got == refs["mixed"]["tokens"]
    assert preempted > 0, "the KV budget was meant to force preemption"


def test_generator_alone_matches_hf(suite):
    """The numerical baseline: vLLM's CPU kernels serve the generator alone exactly like HF generate here."""
    out, refs = suite
    with engine(out / "mixed" / "generator") as llm:
        got = run_all(llm, refs["prompts"], refs["max_new_tokens"])
    assert got == refs["mixed/generator"]["tokens"]
    pytest.generator_alone_vllm = got  # reused by the lambda = 0 test (same generator weights)


def test_lambda_zero_equals_generator_alone(suite):
    out, refs = suite
    with engine(out / "zero" / "pair") as llm:
        got = run_all(llm, refs["prompts"], refs["max_new_tokens"])
    alone = getattr(pytest, "generator_alone_vllm", None) or refs["mixed/generator"]["tokens"]
    assert got == alone
    assert got == refs["zero"]["tokens"]
    # and the latents do change the output at lambda = 0.5 (else the tests above would prove nothing)
    assert refs["mixed"]["tokens"] != alone


@pytest.mark.parametrize("name", ["linear", "standardized"])
def test_learned_projection_checkpoints_match_hf(suite, name):
    """"linear": a learned latent_proj, loaded from the checkpoint, with norm_target="token". "standardized":
    latent_norm="standardize", its saved latent statistics loaded and applied before the fusion."""
    out, refs = suite
    with engine(out / name / "pair", max_num_batched_tokens=32) as llm:
        got = run_all(llm, refs["prompts"], refs["max_new_tokens"])
    assert got == refs[name]["tokens"]
    assert got != refs[f"{name}/generator"]["tokens"]


def test_a_shared_base_pair_serves_after_to_two_copies(suite):
    """A shared-base pair (one base, an adapter per half, a learned projection) cannot be served as it is
    (`flythinker serve` refuses it); its `to_two_copies()` checkpoint serves the shared-base pair's own HF tokens."""
    out, refs = suite
    assert refs["unshared/pair"]["tokens"] == refs["unshared"]["tokens"]  # the conversion, on the HF side
    with engine(out / "unshared" / "pair") as llm:
        got = run_all(llm, refs["prompts"], refs["max_new_tokens"])
    assert got == refs["unshared"]["tokens"]
    assert got != refs["unshared/generator"]["tokens"]  # the reasoner's latents take part


def test_split_context_matches_hf(suite):
    """Split context through the request: prompt = reasoner view ++ generator view, the view's length in
    extra_args (the OpenAI server's vllm_xargs). Four split requests (reasoner views of 12-45 tokens, generator
    views of 5-15) and two shared-context ones in the same batches, staggered, 16-token chunks (chunks straddle
    both view boundaries), 5 KV blocks of 32."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from flythinker.serving.requests import XARG

    out, refs = suite
    n = refs["max_new_tokens"]
    sp = refs["split"]
    eng_prompts = [r + g for r, g in zip(sp["reasoner_prompts"], sp["generator_prompts"])] + refs["prompts"][:2]
    extra = [{XARG: len(r)} for r in sp["reasoner_prompts"]] + [None, None]
    with engine(out / "mixed" / "pair", max_num_batched_tokens=16, num_gpu_blocks_override=6) as llm:
        eng = llm.llm_engine
        done: dict[str, list[int]] = {}
        step = 0
        while len(done) < len(eng_prompts):
            for i, (p, x) in enumerate(zip(eng_prompts, extra)):
                if step == 2 * i:
                    eng.add_request(str(i), {"prompt_token_ids": p},
                                    SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, extra_args=x))
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = list(o.outputs[0].token_ids)
            step += 1
            assert step < 10_000
        with pytest.raises(VLLMValidationError, match=XARG):  # at admission: HTTP 400 in the server
            llm.generate([{"prompt_token_ids": eng_prompts[0]}],
                         SamplingParams(max_tokens=2, extra_args={XARG: "twelve"}), use_tqdm=False)
    got = [done[str(i)] for i in range(len(eng_prompts))]
    assert got[:4] == sp["tokens"]
    assert got[4:] == refs["mixed"]["tokens"][:2]
    # the reasoner's view matters: the same generator views in shared context give other replies
    assert [a != b for a, b in zip(sp["tokens"], refs["split/shared"]["tokens"])] == [True] * 4
