"""CovarianceStore: exact addition, persistence, fingerprints, corrupted files."""

import pytest
import torch
from conftest import text_batches, tiny_llama

from corda_vl import CacheError, CordaError, CovarianceStore, collect_covariances
from corda_vl.calibration.store import model_fingerprint


@pytest.fixture
def store(llama, batches):
    return collect_covariances(llama, batches, progress=False)


def test_stores_add_exactly(llama, batches):
    whole = collect_covariances(llama, batches, progress=False)
    first = collect_covariances(llama, batches[:1], progress=False)
    rest = collect_covariances(llama, batches[1:], progress=False)
    summed = first + rest
    assert summed.counts == whole.counts
    for key in whole.sums:
        torch.testing.assert_close(summed.sums[key], whole.sums[key], rtol=1e-6, atol=1e-5)
    # __add__ leaves its operands alone; merge adds in place
    assert first.counts != whole.counts
    first.merge(rest)
    assert first.counts == whole.counts


def test_sources_live_side_by_side(llama, batches):
    a = collect_covariances(llama, batches[:1], source="nq", progress=False)
    b = collect_covariances(llama, batches[1:], source="math", progress=False)
    both = a + b
    assert both.sources == ["math", "nq"]
    with pytest.raises(CordaError, match="several covariance sources"):
        both.covariance("model.layers.0.self_attn.q_proj")
    torch.testing.assert_close(both.sum("model.layers.0.self_attn.q_proj", "nq"), a.sum("model.layers.0.self_attn.q_proj"))
    assert both.rename_source("nq", "calib").sources == ["calib", "math"]


def test_merge_refuses_another_model(store, batches):
    other = collect_covariances(tiny_llama(seed=5), batches, progress=False)
    with pytest.raises(CacheError, match="different models"):
        store + other


def test_save_load_roundtrip(store, llama, tmp_path):
    path = store.save(tmp_path / "cov.safetensors")
    loaded = CovarianceStore.load(path, model=llama)
    assert loaded.inputs == store.inputs and loaded.counts == store.counts
    assert loaded.fingerprint == store.fingerprint
    for key in store.sums:
        assert torch.equal(loaded.sums[key], store.sums[key])


def test_load_refuses_another_model(store, tmp_path):
    path = store.save(tmp_path / "cov.safetensors")
    with pytest.raises(CacheError, match="another model.*Recalibrate"):
        CovarianceStore.load(path, model=tiny_llama(seed=3))


def test_fingerprint_ignores_dtype_but_not_weights(llama):
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    assert model_fingerprint(llama, names) == model_fingerprint(tiny_llama(dtype=torch.bfloat16), names)
    assert model_fingerprint(llama, names) != model_fingerprint(tiny_llama(seed=1), names)


def test_truncated_file_is_a_clear_error(store, tmp_path):
    path = store.save(tmp_path / "cov.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="truncated or corrupted"):
        CovarianceStore.load(path)


def test_flipped_bytes_fail_the_checksum(store, tmp_path):
    path = store.save(tmp_path / "cov.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        CovarianceStore.load(path)


def test_not_a_store_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"garbage")
    with pytest.raises(CacheError):
        CovarianceStore.load(path)
    with pytest.raises(CacheError, match="does not exist"):
        CovarianceStore.load(tmp_path / "missing.safetensors")


def test_damped_covariance_equals_damping_a_copy_and_leaves_the_sums_alone(store):
    from corda_vl.decomposition.cosvd import damp_covariance

    s = store
    key = next(iter(s.inputs.values()))
    sums = {k: v.clone() for k, v in s.sums.items()}
    damped = s.damped(key, None, (1e-4, 1e-2))
    expected = damp_covariance(s.covariance(key), (1e-4, 1e-2))
    assert torch.equal(damped.matrix, expected.matrix) and damped.damping == expected.damping
    assert all(torch.equal(sums[k], v) for k, v in s.sums.items())


def test_a_split_can_be_left_out_or_taken_alone(llama):
    """Three random splits: the covariance without split2 is the token-weighted mean of split0 and
    split1, the held-out one is split2's, and 'calib' without split2 and 'calib/split2' alone
    have no data in common."""
    store = collect_covariances(llama, text_batches(6), splits=3, progress=False)
    name = store.modules[0]
    assert store.splits_for(name) == ["split0", "split1", "split2"]
    n0, n1 = store.count(name, "calib/split0"), store.count(name, "calib/split1")
    expected = (store.sum(name, "calib/split0").double() + store.sum(name, "calib/split1").double()) / (n0 + n1)
    torch.testing.assert_close(store.covariance(name, "calib", split="split2"), expected)
    assert store.count(name, "calib", "split2") == n0 + n1
    torch.testing.assert_close(store.covariance(name, "calib", split="split2", held_out=True),
                               store.covariance(name, "calib/split2"))
    assert store.leaves(name, "calib", split="split2") == ["calib/split0", "calib/split1"]
    with pytest.raises(CordaError, match="no data outside split 'split2'"):
        store.leaves(name, "calib/split2", split="split2")


@pytest.mark.parametrize("edit", ["swap keys", "blank fingerprint", "count"])
def test_an_edited_header_fails_its_checksum(store, tmp_path, edit):
    """The tensors' own checksums cannot see the header: swapped module names, a blanked model
    fingerprint (which would skip the model check) or an edited token count."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = store.save(tmp_path / "cov.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["corda_vl"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    entries = meta["entries"]
    if edit == "swap keys":
        entries[0]["key"], entries[1]["key"] = entries[1]["key"], entries[0]["key"]
    elif edit == "blank fingerprint":
        meta["fingerprint"] = ""
    else:
        entries[0]["count"] += 1
    save_file(tensors, str(path), metadata={"corda_vl": json.dumps(meta)})
    with pytest.raises(CacheError, match="header .* fails its checksum"):
        CovarianceStore.load(path)


def test_fingerprint_samples_the_last_element_of_a_weight_over_2_24_elements():
    big = torch.nn.Module()
    big.embed = torch.nn.Embedding(4097, 4096)  # 16,781,312 elements: past float32's exact integers
    before = model_fingerprint(big, ["embed"])
    with torch.no_grad():
        big.embed.weight[-1, -1] += 1.0  # the last sampled position is the last element
    assert model_fingerprint(big, ["embed"]) != before
