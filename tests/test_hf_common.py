"""transformers' own common model tests (ModelTesterMixin, ConfigTester) against a tiny FlyThinker pair.

The way model folders in transformers do it: a ModelTester building a tiny config and inputs, and a unittest class
mixing in the upstream mixins. The upstream files are pinned to the installed transformers version: `make install`
runs tests/hf_common/fetch_transformers_tests.py, which extracts them from that version's PyPI sdist into
.cache/transformers-tests/<version>/ (git-ignored). Missing files are an error here, not a skip.
Generation checks come from tests/hf_common/standins.py (the sdist has no tests/generation/).

Tests that cannot apply to a two-model pair are skipped one by one below, each with its reason.
"""

from __future__ import annotations

import sys
import unittest

import torch
import transformers
from hf_common import standins
from hf_common.fetch_transformers_tests import FILES, PACKAGE, package_dir
from model_helpers import single_thread  # noqa: F401  (autouse fixture)
from transformers import LlamaConfig

from flythinker import FlyThinkerConfig, FlyThinkerForCausalLM

_PKG = package_dir(transformers.__version__)
if not all((_PKG / f).is_file() for f in FILES):
    raise RuntimeError(f"transformers {transformers.__version__}'s common test files are missing from {_PKG}: run "
                       f"`make install` (or `python tests/hf_common/fetch_transformers_tests.py`)")
sys.path.insert(0, str(_PKG.parent))
standins.install(PACKAGE)
_common = __import__(f"{PACKAGE}.test_modeling_common", fromlist=["ModelTesterMixin"])
_config_common = __import__(f"{PACKAGE}.test_configuration_common", fromlist=["ConfigTester"])
ModelTesterMixin = _common.ModelTesterMixin
ConfigTester = _config_common.ConfigTester
GenerationTesterMixin = standins.GenerationTesterMixin
ids_tensor = _common.ids_tensor


class FlyThinkerModelTester:
    """Tiny Llama pair (generator H=32, reasoner H=16, 2 layers each), lambda 0.5, shared vocabulary of 99."""

    def __init__(self, parent, batch_size: int = 2, seq_length: int = 7, vocab_size: int = 99,
                 hidden_size: int = 32, num_hidden_layers: int = 2, num_attention_heads: int = 4):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.is_training = True
        self.pad_token_id = 0

    def _llama(self, hidden: int, heads: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=hidden, intermediate_size=37,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=heads,
                           num_key_value_heads=heads // 2, max_position_embeddings=64, pad_token_id=self.pad_token_id,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

    def get_config(self) -> FlyThinkerConfig:
        return FlyThinkerConfig(generator=self._llama(self.hidden_size, self.num_attention_heads),
                                reasoner=self._llama(self.hidden_size // 2, self.num_attention_heads // 2),
                                fusion_lambda=0.5, parallel="off")

    def prepare_config_and_inputs_for_common(self) -> tuple[FlyThinkerConfig, dict]:
        """config and {"input_ids": [B, T] (no pad ids), "attention_mask": [B, T] (row 0 left-padded by 2)}."""
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 3) + 3
        mask = torch.ones_like(input_ids)
        mask[0, :2] = 0
        return self.get_config(), {"input_ids": input_ids, "attention_mask": mask}


class FlyThinkerCommonTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (FlyThinkerForCausalLM,)
    pipeline_model_mapping: dict = {}
    _is_composite = True

    def setUp(self):
        # upstream draws the tester's ids from an unseeded module-level random.Random: seeded here, so a failure
        # in CI reproduces on a rerun (torch is seeded per test by conftest)
        _common.global_rng.seed(0)
        self.model_tester = FlyThinkerModelTester(self)
        # scalar fusion fields: ConfigTester compares each given kwarg with its JSON form (sub-configs default)
        self.config_tester = ConfigTester(self, config_class=FlyThinkerConfig, has_text_modality=False,
                                          fusion_lambda=0.5, norm_target="token", projection="linear")

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # upstream adds causal-LM labels by class name (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES); ours is registered
        # at run time, so add them here the same way: labels = input_ids (shifted inside the loss)
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            inputs["labels"] = inputs["input_ids"].clone()
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    # ---------------------------------------------------------------- skipped: cannot apply to a two-model pair

    @unittest.skip("feeds inputs_embeds WITHOUT input_ids: a pair's reasoner reads token ids (it has its own "
                   "embedding table), so embeddings alone cannot drive it (a clear ValueError); inputs_embeds together "
                   "with input_ids: test_generate_from_inputs_embeds here, tests/test_conformance.py")
    def test_inputs_embeds(self):
        pass

    @unittest.skip("sets tie_word_embeddings on get_text_config() (the generator's config) only, then expects every "
                   "_tied_weights_keys pattern of every submodule tied, including the reasoner's, whose config keeps "
                   "its own tying; test_tied_weights_each_model below ties both configs and checks both")
    def test_tied_weights_keys(self):
        pass

    def test_tied_weights_each_model(self):
        """Both sub-configs tied: each model's LM head shares its own input embedding, and nothing else is shared."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        config.generator.tie_word_embeddings = config.reasoner.tie_word_embeddings = True
        model = FlyThinkerForCausalLM(config)
        for part in (model.generator, model.reasoner):
            assert part.get_output_embeddings().weight is part.get_input_embeddings().weight
        assert model.generator.get_input_embeddings().weight is not model.reasoner.get_input_embeddings().weight
