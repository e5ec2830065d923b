"""save / load / export: stock PEFT loads what we write; the exported LoRA fits the original base."""

import json

import pytest
import torch
from conftest import logits, tiny_llama
from peft import PeftModel
from transformers import LlamaForCausalLM

from corda_vl import CordaConfig, CordaError, build_corda, build_record, collect_covariances, export_lora, load_corda, save_corda


@pytest.fixture
def built(llama, batches):
    store = collect_covariances(llama, batches, progress=False)
    return build_corda(llama, store, CordaConfig(r=4, rank_pattern={"o_proj": 2}), progress=False)


def test_save_then_stock_peft_load_gives_same_logits(built, batches, tmp_path):
    ref = logits(built, batches[0])
    out = save_corda(built, tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "corda_vl.json", "residual"]
    base = LlamaForCausalLM.from_pretrained(out / "residual")
    stock = PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(logits(stock, batches[0]), ref, atol=1e-6, rtol=0)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 4
    assert any(v == 2 for v in config["rank_pattern"].values())


def test_load_corda_restores_model_and_record(built, batches, tmp_path):
    ref = logits(built, batches[0])
    save_corda(built, tmp_path / "run")
    loaded = load_corda(tmp_path / "run")
    torch.testing.assert_close(logits(loaded, batches[0]), ref, atol=1e-6, rtol=0)
    assert build_record(loaded).modules == build_record(built).modules


def test_named_adapter_roundtrip(llama, batches, tmp_path):
    store = collect_covariances(llama, batches, progress=False)
    model = build_corda(llama, store, CordaConfig(r=2), adapter_name="kpm", progress=False)
    ref = logits(model, batches[0])
    save_corda(model, tmp_path / "run")
    loaded = load_corda(tmp_path / "run")
    assert loaded.active_adapter == "kpm"
    torch.testing.assert_close(logits(loaded, batches[0]), ref, atol=1e-6, rtol=0)


def test_save_refuses_a_non_empty_directory(built, tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(CordaError, match="not empty.*overwrite=True"):
        save_corda(built, target)
    assert (target / "keep.txt").read_text() == "user data"
    save_corda(built, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "adapter").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary leftovers


def test_failed_save_leaves_nothing(built, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(type(built), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_corda(built, tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_load_corda_on_a_foreign_folder(tmp_path):
    with pytest.raises(CordaError, match="not a corda_vl folder"):
        load_corda(tmp_path)
    (tmp_path / "corda_vl.json").write_text("{truncated")
    with pytest.raises(CordaError, match="corrupted"):
        load_corda(tmp_path)


def train_a_few_steps(model, batches, steps=3):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", ["corda", "pissa"])
def test_export_lora_applies_to_the_original_base(batches, tmp_path, method):
    original = tiny_llama()
    model = tiny_llama()
    store = collect_covariances(model, batches, progress=False) if method == "corda" else None
    peft_model = build_corda(model, store, CordaConfig(method=method, r=4), progress=False)
    save_corda(peft_model, tmp_path / "init")
    before = logits(peft_model, batches[0])
    train_a_few_steps(peft_model, batches)
    trained = logits(peft_model, batches[0])
    assert (trained - before).abs().max() > 1e-3  # training changed something
    export_lora(peft_model, tmp_path / "init" / "adapter", tmp_path / "lora")
    plain = PeftModel.from_pretrained(original, tmp_path / "lora")
    torch.testing.assert_close(logits(plain, batches[0]), trained, atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 8
    # the initial adapter folder is left as it was
    assert json.loads((tmp_path / "init" / "adapter" / "adapter_config.json").read_text())["r"] == 4


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, message", [
    ("alpha", "changed: \\['adapter/adapter_config.json'\\]"),
    ("rslora", "changed: \\['adapter/adapter_config.json'\\]"),
    ("targets", "changed: \\['adapter/adapter_config.json'\\]"),
    ("original base", "changed: \\['residual/model.safetensors'\\]"),
    ("flipped byte", "changed: \\['adapter/adapter_model.safetensors'\\]"),
])
def test_load_refuses_files_that_changed_since_the_save(built, tmp_path, damage, message):
    from safetensors.torch import save_file

    out = save_corda(built, tmp_path / "c")
    config = out / "adapter" / "adapter_config.json"
    if damage == "alpha":
        _edit_json(config, lora_alpha=99)
    elif damage == "rslora":
        _edit_json(config, use_rslora=True)
    elif damage == "targets":
        _edit_json(config, target_modules=["q_proj"])
    elif damage == "original base":  # the original weights in the residual's place
        save_file({k: v.contiguous() for k, v in tiny_llama().state_dict().items()}, out / "residual" / "model.safetensors")
    else:
        weights = out / "adapter" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x40
        weights.write_bytes(bytes(data))
    with pytest.raises(CordaError, match=message):
        load_corda(out)


def test_an_edited_adapter_config_is_caught_without_checksums_too(built, tmp_path):
    """Folders saved before checksums existed: the recorded ranks and alphas still catch an edit."""
    out = save_corda(built, tmp_path / "c")
    meta = json.loads((out / "corda_vl.json").read_text())
    del meta["files"]
    (out / "corda_vl.json").write_text(json.dumps(meta))
    _edit_json(out / "adapter" / "adapter_config.json", lora_alpha=99)
    with pytest.raises(CordaError, match="does not match the build it was saved with"):
        load_corda(out)
    load_corda(out, verify=False)  # the user's own responsibility


def test_export_refuses_the_initial_adapter_of_another_build(batches, tmp_path):
    first = build_corda(tiny_llama(), None, CordaConfig(method="pissa", r=4), progress=False)
    other = build_corda(tiny_llama(seed=5), None, CordaConfig(method="lora", r=4), progress=False)
    save_corda(other, tmp_path / "other")
    with pytest.raises(CordaError, match="is not the initial adapter of this model"):
        export_lora(first, tmp_path / "other" / "adapter", tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_a_truncated_file_is_an_error_that_names_the_folder(built, tmp_path):
    out = save_corda(built, tmp_path / "c")
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CordaError, match="changed: \\['adapter/adapter_model.safetensors'\\]"):
        load_corda(out)
    with pytest.raises(CordaError, match=f"cannot load {out} .*truncated"):
        load_corda(out, verify=False)
