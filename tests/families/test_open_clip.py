"""open_clip: exact attention conversion, modality routing, exactness at init, the way back."""

import pytest
import torch
from conftest import module_inputs, open_clip_batches, tiny_open_clip

from corda_vl import CordaConfig, TargetError, build_corda, collect_covariances, plan
from corda_vl.families import convert_open_clip, detect_family, to_open_clip_state_dict

open_clip = pytest.importorskip("open_clip")
ALL = ["vision", "text", "projection"]


def encode(model, batches):
    image = next(b["image"] for b in batches if "image" in b)
    text = next(b["text"] for b in batches if "text" in b)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        return base.encode_image(image), base.encode_text(text)


def test_conversion_is_exact_and_reaches_every_linear():
    original, converted = tiny_open_clip(), convert_open_clip(tiny_open_clip())
    batches = open_clip_batches()
    for a, b in zip(encode(original, batches), encode(converted, batches)):
        assert (a - b).abs().max() <= 1e-6
    names = {n for n, m in converted.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "visual.transformer.resblocks.1.attn.out_proj" in names and "visual.proj.linear" in names
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in converted.modules())


def test_zero_shot_helpers_still_work_on_the_converted_model():
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    args = dict(tokenizer=tokenizer, classnames=["cat", "dog", "square"], templates=["a photo of a {}."],
                num_classes_per_batch=2, device="cpu", use_tqdm=False)
    expected = build_zero_shot_classifier(tiny_open_clip(), **args)
    got = build_zero_shot_classifier(convert_open_clip(tiny_open_clip()), **args)
    assert got.shape == (24, 3) and (got - expected).abs().max() <= 1e-6


def test_unconverted_models_are_refused():
    model = tiny_open_clip()
    assert detect_family(model).name == "open_clip"
    with pytest.raises(TargetError, match="convert_open_clip"):
        collect_covariances(model, open_clip_batches(), progress=False)


def test_towers_see_their_own_modality_and_match_direct_inputs():
    model, batches = convert_open_clip(tiny_open_clip()), open_clip_batches()
    store = collect_covariances(model, batches, groups=ALL, progress=False)
    name = "visual.transformer.resblocks.0.attn.k_proj"
    seen = module_inputs(model, name, lambda m, b: m.encode_image(b["image"]), [b for b in batches if "image" in b])
    xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    torch.testing.assert_close(store.sum(name), xs.T @ xs, rtol=1e-5, atol=1e-4)
    assert store.inputs[name] == store.inputs["visual.transformer.resblocks.0.attn.v_proj"]  # shared input
    text_tokens = sum(int((b["text"] != 0).sum()) for b in batches if "text" in b)
    assert store.count("transformer.resblocks.1.mlp.c_fc") == text_tokens
    assert store.count("visual.proj.linear") == store.count("text_projection.linear") == 16


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_outputs_unchanged_at_init_and_the_way_back(mode):
    model, batches = convert_open_clip(tiny_open_clip()), open_clip_batches()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # projections see only 16 pooled rows
        store = collect_covariances(model, batches, groups=ALL, progress=False)
    ref = encode(model, batches)
    config = CordaConfig(r=4, mode=mode, groups=ALL)
    dry = plan(model, config, store)
    peft_model = build_corda(model, store, config, progress=False)
    adapted = sorted(n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert sorted(dry.modules) == adapted and len(adapted) == 26
    for out, expected in zip(encode(peft_model, batches), ref):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    with torch.no_grad():  # "train": move every adapter
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    # float64, so that the comparison sees the merge logic, not float32 rounding of large KPM A factors
    peft_model.double()
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    trained = encode(peft_model, batches)
    stock = tiny_open_clip(seed=9).double()
    stock.load_state_dict(to_open_clip_state_dict(peft_model))
    for out, expected, before in zip(encode(stock, batches), trained, ref):
        torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)
        assert (expected - before.double()).abs().max() > 1e-4  # the adapters did change the outputs


def test_unconvertible_models_are_clear_errors():
    from corda_vl import CordaError

    with pytest.raises(CordaError, match="not an open_clip CLIP"):
        convert_open_clip(torch.nn.Linear(2, 2))
    model = tiny_open_clip()
    model.visual, model.transformer = torch.nn.Conv2d(3, 24, 16), None  # no transformer in either tower
    with pytest.raises(CordaError, match="neither a ViT image tower nor open_clip's own text transformer"):
        convert_open_clip(model)
    bad = torch.nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
    with pytest.raises(CordaError, match="bias_k"):
        from corda_vl.families.open_clip_convert import ExplicitAttention
        ExplicitAttention(bad)


def test_save_corda_and_load_into_a_fresh_converted_model(tmp_path):
    from corda_vl import CordaError, load_corda, save_corda

    model, batches = convert_open_clip(tiny_open_clip()), open_clip_batches()
    store = collect_covariances(model, batches, progress=False)
    peft_model = build_corda(model, store, CordaConfig(r=4), progress=False)
    ref = encode(peft_model, batches)
    save_corda(peft_model, tmp_path / "oc")
    with pytest.raises(CordaError, match="base_model="):
        load_corda(tmp_path / "oc")
    loaded = load_corda(tmp_path / "oc", base_model=convert_open_clip(tiny_open_clip(seed=3)))
    for out, expected in zip(encode(loaded, batches), ref):
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", [
    CordaConfig(method="corda++", r=4),
    CordaConfig(method="corda", r=4, group_ranks={"text": 8}),
], ids=["corda++", "group_ranks"])
def test_per_module_ranks_do_not_collide_between_towers_and_reload(tmp_path, config):
    """The text tower's module names are the ends of the vision tower's
    ('transformer.resblocks.0...' vs 'visual.transformer.resblocks.0...'): each rank must reach
    only its own module, and the save must load in stock PEFT and in load_corda."""
    from peft import PeftModel

    from corda_vl import build_record, load_corda, save_corda

    model, batches = convert_open_clip(tiny_open_clip()), open_clip_batches()
    store = collect_covariances(model, batches, splits=2, progress=False)
    peft_model = build_corda(model, store, config, progress=False)
    record = build_record(peft_model).modules
    built = {n: m.r["default"] for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert built == {n: i["rank"] for n, i in record.items()}
    text = {i["rank"] for n, i in record.items() if i["group"] == "text"}
    vision = {i["rank"] for n, i in record.items() if i["group"] == "vision"}
    if config.group_ranks:
        assert text == {8} and vision == {4}
    ref = encode(peft_model, batches)
    out = save_corda(peft_model, tmp_path / "oc")
    loaded = load_corda(out, base_model=convert_open_clip(tiny_open_clip(seed=3)))
    for got, expected in zip(encode(loaded, batches), ref):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    from safetensors.torch import load_file

    residual = convert_open_clip(tiny_open_clip(seed=3))
    residual.load_state_dict(load_file(out / "residual" / "model.safetensors"), strict=True)
    stock = PeftModel.from_pretrained(residual, out / "adapter")  # stock PEFT, no corda_vl code
    for got, expected in zip(encode(stock, batches), ref):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def tiny_open_clip_with(tower: str, seed: int = 0):
    """An open_clip CLIP whose image tower is not a ViT: a ModifiedResNet or a timm ConvNeXt."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, head_width=8, image_size=32) if tower == "resnet" else \
        CLIPVisionCfg(timm_model_name="convnext_atto", timm_model_pretrained=False, timm_pool="avg",
                      timm_proj="linear", image_size=32)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=1)
    return CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def batches_32px():
    g = torch.Generator().manual_seed(3)
    return [{"image": torch.randn(8, 3, 32, 32, generator=g)} if "image" in b else b for b in open_clip_batches()]


@pytest.mark.parametrize("tower, vision_layers", [("resnet", []), ("convnext", ["visual.head.proj"])])
def test_non_vit_towers_adapt_what_can_be_adapted_exactly_and_go_back_to_stock(tower, vision_layers):
    pytest.importorskip("timm")
    model, batches = convert_open_clip(tiny_open_clip_with(tower)), batches_32px()
    family = detect_family(model)
    assert family.name == "open_clip"
    if not vision_layers:  # ResNet's attention pool hands its weights to F.multi_head_attention_forward
        with pytest.raises(TargetError, match=r"group 'vision' matches no nn.Linear.*groups=\['text'\]"):
            collect_covariances(model, batches, progress=False)
    groups = ["text", "projection"] + (["vision"] if vision_layers else [])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # projections see only 16 pooled rows
        store = collect_covariances(model, batches, groups=groups, progress=False)
    assert [n for n in store.modules if n.startswith("visual")] == vision_layers
    ref = encode(model, batches)
    peft_model = build_corda(model, store, CordaConfig(r=2, groups=groups), progress=False)
    for out, expected in zip(encode(peft_model, batches), ref):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    with torch.no_grad():  # "train": move every adapter, then write a stock open_clip state dict
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    trained = encode(peft_model, batches)
    stock = tiny_open_clip_with(tower, seed=9)
    stock.load_state_dict(to_open_clip_state_dict(peft_model))
    for out, expected in zip(encode(stock, batches), trained):
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
