"""generate()'s decoding options on a MoA model whose plan keeps every token: the base model's output, token for token,
with eager steps and through the graphed decode step (run eagerly on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_dense, build_moa, dense_plan
from transformers import StoppingCriteria


class _StopAt(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


OPTIONS = {
    "sample": dict(do_sample=True, top_k=10, top_p=0.9, temperature=0.7),
    "return-sequences": dict(do_sample=True, num_return_sequences=3),
    "beams": dict(num_beams=3, num_return_sequences=2, length_penalty=0.5),
    "penalties": dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
    "bad-words": dict(bad_words_ids=[[5], [7, 8]], sequence_bias={(9,): 5.0}),
    "min-p-typical": dict(do_sample=True, min_p=0.1, typical_p=0.9),
    "scores": dict(output_scores=True, output_logits=True, return_dict_in_generate=True),
    "hidden-states": dict(output_hidden_states=True, return_dict_in_generate=True),
    "no-cache": dict(use_cache=False),
    "stopping": dict(stopping_criteria=[_StopAt(28)], eos_token_id=[11, 12]),
    "suppress": dict(suppress_tokens=[1, 2, 3], begin_suppress_tokens=[4]),
    "guidance": dict(guidance_scale=1.5),
    "watermark": dict(do_sample=True, watermarking_config={"bias": 2.5, "seeding_scheme": "selfhash"}),
    "static": dict(cache_implementation="static"),
}


@pytest.fixture(scope="module")
def models():
    dense = build_dense("llama", 2, seed=5)
    return dense, build_moa(dense, dense_plan(2, 2))


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_generate_options_give_the_base_models_tokens(monkeypatch, models, name, graphed):
    dense, moa = models
    if graphed:  # generate()'s CUDA path on the CPU: a static cache, steps through GraphedDecodeStep
        monkeypatch.setattr(type(moa), "_moa_graphs_wanted", lambda self, config: not config.disable_compile)
        moa.get_compiled_call().cuda_graph = False
    ids = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    outputs = []
    for model, extra in ((dense, {}), (moa, {} if graphed else {"disable_compile": True})):
        torch.manual_seed(0)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, **OPTIONS[name], **extra)
        outputs.append(out)
    want, got = outputs
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want)
        return
    assert torch.equal(got.sequences, want.sequences)
    for field in ("scores", "logits"):
        for a, b in zip(getattr(got, field) or (), getattr(want, field) or (), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if want.hidden_states is not None:
        assert len(got.hidden_states) == len(want.hidden_states)
        for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
            torch.testing.assert_close(a[-1], b[-1], rtol=1e-4, atol=1e-4)
