"""Family registry and target resolution."""

import pytest
import torch
from conftest import tiny_llama

from corda_vl import UnknownFamilyError
from corda_vl.families import detect_family, get_family, registered_families
from corda_vl.targets import resolve_targets


def test_llama_is_detected_by_structure(llama):
    family = detect_family(llama)
    assert family.name == "llama" and "llama" in registered_families()
    names = [t.name for t in resolve_targets(llama, family)]
    assert len(names) == 14 and "lm_head" not in names
    assert all(t.group == "language" for t in resolve_targets(llama, family))


def test_unknown_family_says_how_to_add_one():
    with pytest.raises(UnknownFamilyError, match="Sequential.*register_family"):
        detect_family(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(UnknownFamilyError, match="registered"):
        get_family("nope")


def test_peft_syntax_regex_and_exclude(llama):
    family = detect_family(llama)
    regex = [t.name for t in resolve_targets(llama, family, target_modules=r".*layers\.1\.mlp\..*")]
    assert regex == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    excluded = [t.name for t in resolve_targets(llama, family, exclude_modules=["q_proj", "k_proj", "v_proj", "o_proj"])]
    assert len(excluded) == 6 and not any("attn" in n for n in excluded)


def test_llama_batches_accept_tensors_and_dicts():
    model = tiny_llama()
    family = detect_family(model)
    ids = torch.tensor([3, 4, 5])
    assert family.prepare(model, ids)["input_ids"].shape == (1, 3)
    batch = {"input_ids": ids[None], "attention_mask": torch.tensor([[1, 1, 0]]), "labels": 1}
    routed = family.route(model, family.prepare(model, batch))
    assert routed["language"][""].tolist() == [[True, True, False]]


def test_a_group_that_matches_nothing_is_an_error(llama):
    from corda_vl import TargetError

    decoder_only = llama.model  # LlamaModel: the decoder layers without an LM head
    with pytest.raises(TargetError, match="group 'head' matches no nn.Linear"):
        resolve_targets(decoder_only, detect_family(decoder_only), groups=["head"])


def tiny_mllama():
    """A vision-language model whose language layers look like LLaMA's, in a layout no family
    supports yet (cross-attention layers that read image states)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], pad_token_id=0)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8, vision_output_dim=32, intermediate_layers_indices=[0], max_num_tiles=4)
    return MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision, image_token_index=90))


def test_a_vlm_no_family_describes_is_never_taken_for_a_text_model():
    with pytest.raises(UnknownFamilyError, match=r"vision-language model \(model_type 'mllama'\).*registered"):
        detect_family(tiny_mllama())


def test_conv1d_layers_outside_gpt2s_layout_are_named_in_the_error():
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(UnknownFamilyError, match="Conv1D"):
        detect_family(torch.nn.Sequential(Conv1D(4, 4)))
