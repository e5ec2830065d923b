"""Layer-sequential building equals the all-at-once path, with one block's covariances alive."""

import pytest
import torch
from conftest import llava_batches, logits, text_batches, tiny_llama, tiny_llava

from corda_vl import (CalibrationError, CordaConfig, CordaError, build_corda, build_corda_sequential, build_record,
                      collect_covariances, load_corda, save_corda)
from corda_vl.scaleout.sequential import block_stack
from corda_vl.targets import resolve_targets
from corda_vl.families import detect_family


def all_at_once(model, batches, config, **calib):
    store = collect_covariances(model, batches, groups=config.groups, progress=False, **calib)
    return build_corda(model, store, config, progress=False), store


def assert_same_state(a, b, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            assert torch.allclose(sa[key], sb[key], rtol=1e-3, atol=1e-4), key


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_sequential_equals_all_at_once_bit_for_bit(mode):
    config = CordaConfig(method="corda", mode=mode, r=4)
    want, store = all_at_once(tiny_llama(), text_batches(5), config)
    got = build_corda_sequential(tiny_llama(), text_batches(5), config, progress=False)
    assert_same_state(got, want)
    assert build_record(got).modules == build_record(want).modules
    calibration = build_record(got).calibration
    # one block's covariances at a time: half the store of this 2-layer model
    assert calibration["peak_covariance_bytes"] == store.nbytes() // 2
    assert calibration["blocks"] == 2


def test_outputs_unchanged_at_init_and_save_load_round_trip(tmp_path):
    batches = text_batches(3)
    model = tiny_llama()
    ref = logits(model, batches[0])
    peft_model = build_corda_sequential(model, batches, CordaConfig(r=4), progress=False)
    assert torch.allclose(logits(peft_model, batches[0]), ref, atol=1e-5)
    save_corda(peft_model, tmp_path / "out")
    loaded = load_corda(tmp_path / "out")
    assert torch.allclose(logits(loaded, batches[0]), ref, atol=1e-5)
    assert build_record(loaded).calibration["sequential"] is True


def test_cache_on_disk_gives_the_same_adapters(tmp_path):
    config = CordaConfig(r=4)
    want = build_corda_sequential(tiny_llama(), text_batches(4), config, progress=False)
    got = build_corda_sequential(tiny_llama(), text_batches(4), config, offload_dir=tmp_path, progress=False)
    assert_same_state(got, want)
    assert build_record(got).calibration["cache_on_disk"]
    assert list(tmp_path.iterdir()) == []  # the temporary cache folder is removed


def test_bfloat16_cache_is_close_and_halves_the_cache():
    config = CordaConfig(r=4)
    want = build_corda_sequential(tiny_llama(), text_batches(4), config, progress=False)
    got = build_corda_sequential(tiny_llama(), text_batches(4), config, cache_dtype=torch.bfloat16, progress=False)
    assert build_record(got).calibration["cache_bytes"] * 2 == build_record(want).calibration["cache_bytes"]
    # bf16 rounding of the block inputs moves the covariances slightly; the adapters' products stay close
    for name, module in want.get_base_model().named_modules():
        if hasattr(module, "lora_A"):
            other = got.get_base_model().get_submodule(name)
            delta_w = module.lora_B["default"].weight @ module.lora_A["default"].weight
            delta_g = other.lora_B["default"].weight @ other.lora_A["default"].weight
            assert (delta_w - delta_g).norm() < 0.05 * delta_w.norm(), name


def test_llava_language_stack_equals_all_at_once():
    config = CordaConfig(r=4, groups=["language"])
    want, _ = all_at_once(tiny_llava(), llava_batches(), config)
    got = build_corda_sequential(tiny_llava(), llava_batches(), config, progress=False)
    assert_same_state(got, want)


def test_targets_in_several_stacks_are_refused_before_any_work():
    model = tiny_llava()
    with pytest.raises(CordaError, match="one stack of repeated blocks"):
        build_corda_sequential(model, llava_batches(), CordaConfig(r=4, groups=["vision", "language"]),
                               progress=False)
    assert not hasattr(model, "peft_config")


def test_block_stack_finds_the_decoder_layers():
    model = tiny_llama()
    targets = resolve_targets(model, detect_family(model), None, None, None)
    name, stack, members = block_stack(model, targets)
    assert name == "model.layers" and stack is model.model.layers
    assert [[t.name for t in inside] for inside in members] == [
        [t.name for t in targets if t.name.startswith(f"model.layers.{i}.")] for i in range(len(stack))]


def test_corda_plus_plus_sequential_equals_all_at_once():
    """Every method that needs a store runs block by block: CorDA++ keeps each layer's scores and
    components, then allocates over all layers, exactly as when every covariance is in memory."""
    config = CordaConfig(method="corda++", r=4)
    want, _ = all_at_once(tiny_llama(), text_batches(5), config)
    got = build_corda_sequential(tiny_llama(), text_batches(5), config, progress=False)
    assert_same_state(got, want)
    assert build_record(got).modules == build_record(want).modules
    assert build_record(got).budget == build_record(want).budget
    ranks = {m["rank"] for m in build_record(got).modules.values()}
    assert len(ranks) > 1  # the allocation really moved rank between layers


def test_baselines_pass_through():
    milora = build_corda_sequential(tiny_llama(), [], CordaConfig(method="milora", r=4), progress=False)
    assert build_record(milora).modules and build_record(milora).calibration is None


def test_empty_and_bad_calibration_data():
    with pytest.raises(CalibrationError, match="saw no data"):
        build_corda_sequential(tiny_llama(), [], CordaConfig(r=4), progress=False)
    batches = text_batches(2)
    model = tiny_llama()
    model.model.layers[0].self_attn.o_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="layers.0.mlp.gate_proj.*NaN/Inf"):
        build_corda_sequential(model, batches, CordaConfig(r=4), progress=False)
    assert not hasattr(model, "peft_config")  # nothing written


def test_calibrate_and_build_goes_sequential_only_over_the_memory_limit():
    from corda_vl import calibrate_and_build

    config = CordaConfig(r=4)
    roomy = calibrate_and_build(tiny_llama(), text_batches(3), config, memory_limit=10**9, progress=False)
    assert build_record(roomy).calibration is None
    tight = calibrate_and_build(tiny_llama(), text_batches(3), config, memory_limit=1000, progress=False)
    assert build_record(tight).calibration["sequential"]
    assert_same_state(tight, roomy)
    cordapp = CordaConfig(method="corda++", r=4)
    tight = calibrate_and_build(tiny_llama(), text_batches(3), cordapp, memory_limit=1000, progress=False)
    roomy = calibrate_and_build(tiny_llama(), text_batches(3), cordapp, memory_limit=10**9, progress=False)
    assert build_record(tight).calibration["sequential"] and build_record(roomy).calibration is None
    assert_same_state(tight, roomy)


def tiny_qwen2_sliding(layer_types):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_types),
                         num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, layer_types=layer_types, attn_implementation="eager")
    return Qwen2ForCausalLM(config).eval()


def test_blocks_with_their_own_masks_get_their_own_arguments():
    """Qwen2 / Gemma-style stacks alternate full and sliding-window attention: each block must be
    replayed with the mask it gets in the full forward, not block 0's."""
    layer_types = ["full_attention", "sliding_attention", "full_attention"]
    batches = text_batches(3, length=24, pad=False)
    config = CordaConfig(r=4, mode="ipm")
    want, _ = all_at_once(tiny_qwen2_sliding(layer_types), batches, config)
    got = build_corda_sequential(tiny_qwen2_sliding(layer_types), batches, config, progress=False)
    assert_same_state(got, want)
