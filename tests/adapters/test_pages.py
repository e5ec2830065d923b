"""prefault_for_writing: pages become private and resident, values and files stay as they were."""

import hashlib
import mmap
import sys

import pytest
import torch
from conftest import logits, text_batches, tiny_llama

import corda_vl.adapters.build as adapters
from corda_vl import CordaConfig, build_corda, collect_covariances
from corda_vl.adapters.pages import prefault_for_writing

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux")


def _anonymous_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


@linux_only
def test_a_privately_mapped_file_tensor_becomes_private_memory_with_its_values(tmp_path):
    values = torch.randn(4 << 20, generator=torch.Generator().manual_seed(0))  # 16 MB
    path = tmp_path / "weights.bin"
    path.write_bytes(values.numpy().tobytes())
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE, as from_pretrained
    tensor = torch.frombuffer(mapping, dtype=torch.float32)
    assert torch.equal(tensor, values)  # read: the file's pages, nothing private yet
    before = _anonymous_mb()
    assert prefault_for_writing([tensor]) == 1
    assert _anonymous_mb() - before > 12  # each page copied now, not at its first write
    assert torch.equal(tensor, values)
    tensor.mul_(2)
    del tensor
    mapping.close()
    assert torch.equal(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.float32), values)


def test_tensors_without_cpu_pages_are_left_alone():
    assert prefault_for_writing([torch.empty(8, device="meta"), torch.empty(0), torch.ones(4, 4).T]) == 0


def test_build_prefaults_every_target_weight_before_rewriting_it(monkeypatch):
    model = tiny_llama()
    batches = text_batches()
    reference = logits(model, batches[0])
    store = collect_covariances(model, batches, progress=False)
    seen = {}

    def spy(tensors):
        tensors = list(tensors)
        seen.update((t.data_ptr(), t.clone()) for t in tensors)
        return prefault_for_writing(tensors)

    monkeypatch.setattr(adapters, "prefault_for_writing", spy)
    peft_model = build_corda(model, store, CordaConfig(r=4, mode="ipm"), progress=False)
    weights = {name: module.weight for name, module in peft_model.named_modules() if name.endswith("base_layer")}
    assert len(weights) == 14 and set(seen) == {w.data_ptr() for w in weights.values()}
    assert not any(torch.equal(seen[w.data_ptr()], w) for w in weights.values())  # called before the writes
    torch.testing.assert_close(logits(peft_model, batches[0]), reference, rtol=0, atol=1e-4)


@linux_only
def test_building_on_a_checkpoint_loaded_from_disk_leaves_the_file_unchanged(tmp_path):
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    checkpoint = tmp_path / "model.safetensors"
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    batches = text_batches()
    reference = logits(model, batches[0])
    store = collect_covariances(model, batches, progress=False)
    peft_model = build_corda(model, store, CordaConfig(r=4, mode="kpm"), progress=False)
    torch.testing.assert_close(logits(peft_model, batches[0]), reference, rtol=0, atol=1e-4)
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
