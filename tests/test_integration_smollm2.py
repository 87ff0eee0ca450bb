"""FlyThinker on the real offline SmolLM2-135M-Instruct pair (the same checkpoint as generator and reasoner)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from model_helpers import single_thread  # noqa: F401  (autouse fixture)
from transformers import TextStreamer

from flythinker import FlyThinkerForCausalLM
from flythinker.hub import load_pretrained

pytestmark = pytest.mark.integration

NEW = 12


@pytest.fixture(scope="module")
def smol():
    gen, tok = load_pretrained("smollm2-135m-instruct")
    rsn, _ = load_pretrained("smollm2-135m-instruct", with_tokenizer=False)
    msgs = [{"role": "user", "content": "Give me one tip to sleep better."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        plain = gen.generate(**enc, **kw)
    return gen, rsn, tok, enc, kw, plain


@torch.no_grad()
def test_lambda_zero_is_the_generator(smol):
    gen, rsn, tok, enc, kw, plain = smol
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.0, projection="pad").eval()
    out = model.generate(**enc, **kw)
    assert torch.equal(out, plain)
    # logits to 1e-5 on the sequential (oracle) path; the overlapped prefill of parallel="auto" splits G's prompt
    # into chunks, which moves fp32 logits of magnitude ~20 by up to ~7e-5 (different matmul shapes)
    seq = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.0, parallel="off", projection="pad").eval()
    ids = plain[:, -8:]
    torch.testing.assert_close(seq(ids).logits, gen(ids).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_lambda_half_is_different_but_valid(smol, capsys):
    gen, rsn, tok, enc, kw, plain = smol
    model = FlyThinkerForCausalLM.from_pair(gen, rsn, fusion_lambda=0.5, projection="pad").eval()
    out = model.generate(**enc, **kw, streamer=TextStreamer(tok, skip_prompt=True), return_dict_in_generate=True,
                         output_logits=True)
    P = enc["input_ids"].shape[1]
    assert out.sequences.shape[1] > P and not torch.equal(out.sequences, plain)
    assert all(torch.isfinite(lg).all() for lg in out.logits)
    text = tok.decode(out.sequences[0, P:], skip_special_tokens=True)
    assert text.strip() and "\ufffd" not in text
    assert capsys.readouterr().out.strip().startswith(text.strip()[:10])
    print(f"\nlambda=0.5: {text!r}\nplain     : {tok.decode(plain[0, P:], skip_special_tokens=True)!r}")


_KILLED_CONVERSION = textwrap.dedent("""
    import os, signal
    from transformers import PreTrainedModel
    real = PreTrainedModel.save_pretrained
    def save_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # killed after the weights, before the tokenizer is written
    PreTrainedModel.save_pretrained = save_then_die
    from flythinker.hub import resolve
    resolve("smollm2-135m-instruct")
""")


def test_interrupted_conversion_leaves_no_temp_folder(tmp_path):
    """A GGUF conversion killed mid-write leaves no cache entry, only a temporary folder tagged with the dead
    writer's pid, which the next writer of the entry removes (`atomic_directory` starts with `clean_stale_temps`,
    tests/test_hub.py); before, the killed run's ~109 MB temporary folder stayed there forever. The second
    conversion itself is left out to keep this test to one GGUF load (~30 s idle, 90 s at load 10)."""
    from flythinker.hub import clean_stale_temps

    env = dict(os.environ, FLYTHINKER_CACHE=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CONVERSION], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    dest = tmp_path / "models" / "smollm2-135m-instruct"
    left = [p for p in dest.parent.iterdir() if p.is_dir()]
    assert not dest.exists()
    assert len(left) == 1 and left[0].name.startswith(f".{dest.name}.tmp-{proc.pid}-"), left
    assert sum(f.stat().st_size for f in left[0].rglob("*")) > 50e6  # the killed run's weights
    assert clean_stale_temps(dest) == left
    assert [p for p in dest.parent.iterdir() if p.is_dir()] == []
