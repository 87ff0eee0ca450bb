"""flythinker's own stand-ins for the three helper modules transformers' test_modeling_common.py imports but its PyPI
sdist does not ship (tests/exporters/, tests/generation/, tests/utils/; checked for 5.24.0). Written here, not copied.

- `ExportTesterMixin` (base class of ModelTesterMixin upstream): empty; torch.export of the decode step is tested
  on its own in tests/test_hf_common.py.
- `config_common_kwargs`: upstream's dict of common PreTrainedConfig kwargs, read only for non-composite configs
  (FlyThinkerConfig has sub-configs, so the check that uses it returns early): an empty dict.
- `GenerationTesterMixin`: a compact generation conformance mixin of ours with upstream's test names for the
  behaviours it checks, each against a reference computed without generate's machinery where one exists.

`install(package)` registers them as `<package>.exporters.test_export`, `<package>.generation.test_utils` and
`<package>.utils.test_configuration_utils` so the upstream files' relative imports resolve.
"""

from __future__ import annotations

import sys
import types

import torch

config_common_kwargs: dict = {}


class ExportTesterMixin:
    """Stand-in for transformers' tests/exporters/test_export.py mixin (not in the sdist): no tests."""


def _greedy_reference(model, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation `[B, T + n]` by a full no-cache forward per step (the oracle for cached decoding)."""
    seq, m = ids, mask
    for _ in range(n):
        nxt = model(seq, attention_mask=m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return seq


class GenerationTesterMixin:
    """Generation conformance checks (the subset of upstream's GenerationTesterMixin that a decoder-only pair
    must pass). Needs `self.model_tester.prepare_config_and_inputs_for_common()` and `self.all_model_classes`."""

    max_new_tokens = 4

    def _gen_model_and_inputs(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.all_model_classes[0](config).eval()
        gen_kw = {"max_new_tokens": self.max_new_tokens, "pad_token_id": config.generator.pad_token_id,
                  "eos_token_id": None, "min_new_tokens": self.max_new_tokens}
        return model, inputs["input_ids"], inputs["attention_mask"], gen_kw

    @torch.no_grad()
    def test_greedy_generate(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        out = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        torch.testing.assert_close(out, _greedy_reference(model, ids, mask, self.max_new_tokens), rtol=0, atol=0)

    @torch.no_grad()
    def test_greedy_generate_dict_outputs_use_cache(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        outs = [model.generate(ids, attention_mask=mask, do_sample=False, use_cache=c, return_dict_in_generate=True,
                               output_scores=True, output_logits=True, **kw) for c in (True, False)]
        for o in outs:
            assert o.sequences.shape == (ids.shape[0], ids.shape[1] + self.max_new_tokens)
            assert len(o.scores) == len(o.logits) == self.max_new_tokens
        assert torch.equal(outs[0].sequences, outs[1].sequences)
        for a, b in zip(outs[0].logits, outs[1].logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    @torch.no_grad()
    def test_sample_generate(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(model.generate(ids, attention_mask=mask, do_sample=True, top_k=10, temperature=0.7,
                                       num_return_sequences=2, **kw))
        assert runs[0].shape == (2 * ids.shape[0], ids.shape[1] + self.max_new_tokens)
        assert torch.equal(runs[0], runs[1])

    @torch.no_grad()
    def test_beam_search_generate(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        outs = [model.generate(ids, attention_mask=mask, do_sample=False, num_beams=2, num_return_sequences=2,
                               use_cache=c, **kw) for c in (True, False)]
        assert outs[0].shape == (2 * ids.shape[0], ids.shape[1] + self.max_new_tokens)
        assert torch.equal(outs[0], outs[1])  # cached beams (reordered caches) == recomputed beams

    @torch.no_grad()
    def test_prompt_lookup_decoding_matches_greedy_search(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        ids, mask = ids[1:], mask[1:]  # transformers' assisted decoding takes one row
        plain = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        lookup = model.generate(ids, attention_mask=mask, do_sample=False, prompt_lookup_num_tokens=2, **kw)
        assert torch.equal(plain, lookup)

    @torch.no_grad()
    def test_left_padding_compatibility(self):
        model, ids, mask, _ = self._gen_model_and_inputs()
        pad = torch.full((ids.shape[0], 3), model.config.generator.pad_token_id, dtype=ids.dtype)
        padded_ids = torch.cat([pad, ids], 1)
        padded_mask = torch.cat([torch.zeros_like(pad), mask], 1)
        a = model(ids, attention_mask=mask).logits[:, -1]
        b = model(padded_ids, attention_mask=padded_mask).logits[:, -1]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    @torch.no_grad()
    def test_generate_continue_from_past_key_values(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        full = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        n = self.max_new_tokens // 2
        half_kw = {**kw, "max_new_tokens": n, "min_new_tokens": n}
        first = model.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True, **half_kw)
        seq = first.sequences
        cont = model.generate(seq, attention_mask=torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1),
                              past_key_values=first.past_key_values, do_sample=False,
                              **{**kw, "max_new_tokens": self.max_new_tokens - n,
                                 "min_new_tokens": self.max_new_tokens - n})
        assert torch.equal(cont, full)

    @torch.no_grad()
    def test_generate_from_inputs_embeds(self):
        """input_ids + inputs_embeds: the reasoner reads the ids, the generator's given embeddings get the latents.
        Embeddings equal to E(ids) reproduce plain generation; other embeddings change it."""
        model, ids, mask, kw = self._gen_model_and_inputs()
        plain = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        emb = model.get_input_embeddings()(ids)
        same = model.generate(ids, inputs_embeds=emb, attention_mask=mask, do_sample=False, **kw)
        assert torch.equal(same, plain)
        # Compare the first step's logits, not the tokens: a tiny random pair's greedy tokens coincided for the two
        # inputs in 7 of 40 draws of the tester's (unseeded) random ids; the logits were never within 1e-3.
        dict_kw = {**kw, "return_dict_in_generate": True, "output_logits": True}
        plain_d = model.generate(ids, attention_mask=mask, do_sample=False, **dict_kw)
        other = model.generate(ids, inputs_embeds=emb * 3.0, attention_mask=mask, do_sample=False, **dict_kw)
        assert other.sequences.shape == plain.shape
        assert not torch.allclose(other.logits[0], plain_d.logits[0], atol=1e-3)

    @torch.no_grad()
    def test_generate_with_static_cache(self):
        model, ids, mask, kw = self._gen_model_and_inputs()
        plain = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
        for impl in ("static", "offloaded"):
            out = model.generate(ids, attention_mask=mask, do_sample=False, cache_implementation=impl, **kw)
            assert torch.equal(out, plain), impl


def install(package: str) -> None:
    """Register the stand-ins under `package` (the extracted upstream test package's name)."""
    me = sys.modules[__name__]
    for sub, attrs in (("exporters.test_export", ("ExportTesterMixin",)),
                       ("generation.test_utils", ("GenerationTesterMixin",)),
                       ("utils.test_configuration_utils", ("config_common_kwargs",))):
        parent_name = f"{package}.{sub.split('.')[0]}"
        if parent_name not in sys.modules:
            parent = types.ModuleType(parent_name)
            parent.__path__ = []  # a package with no files: only these registered submodules
            sys.modules[parent_name] = parent
        mod = types.ModuleType(f"{package}.{sub}", f"flythinker stand-in (tests/hf_common/standins.py) for {sub}")
        for a in attrs:
            setattr(mod, a, getattr(me, a))
        sys.modules[mod.__name__] = mod
        setattr(sys.modules[parent_name], sub.split(".")[1], mod)
