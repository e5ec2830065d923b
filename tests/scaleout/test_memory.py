"""The memory planner: exact against real stores on tiny models, weightless on a 7B config."""

import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clip_batches, llava_batches, text_batches, tiny_clip, tiny_gpt2, tiny_llama, tiny_llava

from corda_vl import collect_covariances
from corda_vl.errors import CordaError
from corda_vl.scaleout.memory import MemoryPlan, plan_memory

ROOT = Path(__file__).resolve().parents[2]
LLAVA_GROUPS = ["vision", "projector", "language"]


def _block(key: str) -> str:
    """Independent block naming: the 'layers.N' prefix, else the module itself."""
    match = re.match(r"(.*(?:layers|h)\.\d+)\.", key)
    return match.group(1) if match else key


def _per_block_max(store) -> int:
    totals: dict[str, int] = {}
    for (key, _), tensor in store.sums.items():
        totals[_block(key)] = totals.get(_block(key), 0) + tensor.numel() * tensor.element_size()
    return max(totals.values())


CASES = {
    "llama": (tiny_llama, text_batches, None),
    "gpt2": (tiny_gpt2, text_batches, None),  # Conv1D layers
    "clip": (tiny_clip, clip_batches, None),
    "llava": (tiny_llava, llava_batches, LLAVA_GROUPS),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_a_real_store(case, dtype):
    build, batches, groups = CASES[case]
    model = build()
    store = collect_covariances(model, batches(), groups=groups, dtype=dtype, progress=False)
    for subject in (model, model.config):  # a model and its bare config plan the same store
        plan = plan_memory(subject, groups=groups)
        assert plan.sharing.startswith("detected")
        assert plan.covariance_bytes(dtype) == store.nbytes()
        assert plan.inputs == len(set(store.inputs.values()))
        assert plan.matrices == len(store.sums)
        assert plan.modules == len(store.inputs)
        assert plan.sequential_bytes(dtype) == _per_block_max(store)
        assert plan.sequential_bytes(dtype) < plan.covariance_bytes(dtype)  # 2 layers: about half
    shared = plan.inputs < plan.modules  # q/k/v, gate/up, fc1...; GPT-2's fused c_attn shares no input
    assert (plan.covariance_bytes(dtype, dedupe=False) > plan.covariance_bytes(dtype)) == shared
    assert shared == (case != "gpt2")


def test_no_dedupe_is_one_matrix_per_module():
    model = tiny_llama()
    plan = plan_memory(model)
    per_module = sum(model.get_submodule(n).in_features ** 2 for n in collect_covariances(
        model, text_batches(1), progress=False).inputs)
    assert plan.covariance_bytes(torch.float32, dedupe=False) == per_module * 4
    assert plan.weight_bytes == sum(p.numel() * 4 for p in model.parameters())  # the model's own dtype
    assert plan.weight_dtype == "float32"


def test_llama_2_7b_config_plans_without_weights():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    plan = plan_memory(config, tokens=1000, weight_dtype=torch.bfloat16, cache_dtype=torch.float32)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < 2 * 2**30  # the bf16 weights alone would be 12.6 GiB
    assert plan.parameters == 6_738_415_616 and plan.weight_bytes == 2 * 6_738_415_616
    assert (plan.modules, plan.inputs, plan.matrices, len(plan.blocks)) == (224, 128, 128, 32)
    per_layer = 3 * 4096**2 + 11008**2  # q/k/v, o, gate/up, down
    assert plan.covariance_bytes(torch.float32) == 32 * per_layer * 4
    assert plan.covariance_bytes(torch.float64, dedupe=False) == 32 * (6 * 4096**2 + 11008**2) * 8
    assert plan.sequential_bytes(torch.float32) == per_layer * 4
    assert plan.cache_bytes() == 1000 * 4096 * 4  # one generation of float32 hidden states
    assert plan.largest_block().name == "model.layers.0"
    assert max(plan.blocks, key=lambda b: b.workspace_elements).workspace_module == "model.layers.0.mlp.down_proj"
    assert plan.peak_bytes(torch.float64, sequential=True) < plan.peak_bytes(torch.float64, sequential=False)
    text = str(plan)
    for row in ("model weights (bfloat16)", "shared inputs deduped", "no dedupe", "layer-sequential (model.layers.0)",
                "cached hidden states, one block's input (float32)", "decomposition workspace", "cache offloaded"):
        assert row in text


def test_config_file_and_folder(tmp_path):
    config = tiny_llama().config
    config.save_pretrained(tmp_path)
    expected = plan_memory(config)
    assert plan_memory(tmp_path) == expected
    assert plan_memory(str(tmp_path / "config.json")) == expected


def test_failed_detection_falls_back_to_no_dedupe(monkeypatch):
    import dataclasses

    import corda_vl.scaleout.memory as memory

    def broken(model):
        raise RuntimeError("probe exploded")

    family = dataclasses.replace(memory.detect_family(tiny_llama()), probe_batch=broken)
    monkeypatch.setattr(memory, "detect_family", lambda model: family)
    plan = plan_memory(tiny_llama())
    assert plan.sharing.startswith("NOT detected") and "probe exploded" in plan.sharing
    assert plan.inputs == plan.modules == plan.matrices
    assert plan.covariance_bytes() == plan.covariance_bytes(dedupe=False)
    assert "NOT detected" in str(plan)


def test_bad_input_says_what_to_do(tmp_path):
    from transformers import BertConfig, PretrainedConfig

    with pytest.raises(CordaError, match="not a model family corda_vl knows"):
        plan_memory(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    with pytest.raises(CordaError, match="takes a transformers config"):
        plan_memory({"hidden_size": 4096})
    with pytest.raises(CordaError, match="not a config.json or model folder"):
        plan_memory(tmp_path / "missing.json")
    with pytest.raises(CordaError, match="no transformers auto class"):
        plan_memory(PretrainedConfig())


def test_recipe_prints_a_plan_for_a_local_config(tmp_path):
    tiny_llava().config.save_pretrained(tmp_path)
    cmd = [sys.executable, str(ROOT / "recipes" / "plan_memory.py"), "--config", str(tmp_path), "--tokens", "4096",
           "--images", "8", "--groups", "vision,projector,language"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "LlavaForConditionalGeneration" in proc.stdout and "peak, all at once" in proc.stdout
    assert "8 images x 17 tokens" in proc.stdout


def test_plan_is_a_frozen_dataclass():
    assert MemoryPlan.__dataclass_params__.frozen


def test_notes_say_when_targets_span_several_stacks():
    assert plan_memory(tiny_llama()).notes == ()
    (note,) = plan_memory(tiny_llava(), groups=LLAVA_GROUPS).notes
    assert "2 stacks of layers and 2 modules outside them" in note and "groups=['language']" in note


def test_sequential_figures_match_build_corda_sequential():
    sequential = pytest.importorskip("corda_vl.scaleout.sequential")
    from corda_vl import CordaConfig, build_record

    batches = text_batches()
    tokens = sum(b["input_ids"].numel() for b in batches)  # the cache holds padded sequences
    plan = plan_memory(tiny_llama(), tokens=tokens)
    peft_model = sequential.build_corda_sequential(tiny_llama(), batches, CordaConfig(r=4), progress=False)
    record = build_record(peft_model).calibration
    assert record["peak_covariance_bytes"] == plan.sequential_bytes(torch.float32)
    assert record["cache_bytes"] == plan.cache_bytes()
