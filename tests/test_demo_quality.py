"""The shipped demo model with the plan `make demo` found (50% KV density): MoA keeps retrieval that a uniform
window of the same density loses and stays near dense (fixed seeds; the full numbers are in benchmarks/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from moa_hub.apply import moa_twin, set_plan
from moa_hub.evaluate import score_retrieval
from moa_hub.plan import MoaPlan, uniform_like

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo"


@pytest.mark.slow
def test_moa_plan_beats_uniform_window_on_demo_retrieval():
    dense = LlamaForCausalLM.from_pretrained(DEMO / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model")
    plan = MoaPlan.load(DEMO / "plan-density-0.5.json")
    twin = moa_twin(dense, plan)
    length, depths = 1024, (0.1, 0.3, 0.5, 0.7, 0.9)
    moa = score_retrieval(twin, tokenizer, [length], depths=depths)[0].accuracy
    set_plan(twin, uniform_like(plan, length))
    uniform = score_retrieval(twin, tokenizer, [length], depths=depths)[0].accuracy
    dense_acc = score_retrieval(dense, tokenizer, [length], depths=depths)[0].accuracy
    assert dense_acc >= 0.9
    assert moa > uniform, (moa, uniform)
    assert moa >= dense_acc - 0.2, (moa, dense_acc)  # the measured-importance plan keeps (near) dense retrieval
