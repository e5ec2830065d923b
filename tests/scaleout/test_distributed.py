"""Several processes (torchrun, gloo on CPU) give the single-process store and adapters.

The worker (tests/distributed_worker.py) runs once with 1 and once with 2 processes; both build
the adapters from the same store file, with the same thread count, so the decompositions are
compared bit for bit. Calibration is compared with the single-process store at a stated
tolerance: the sum over batches is added in another order (per rank, then across ranks).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clip_batches, text_batches, tiny_clip, tiny_llama
from safetensors.torch import load_file

from corda_vl import CovarianceStore, collect_covariances
from corda_vl.scaleout.distributed import assign_owners, decomposition_cost, owned_keys, world

WORKER = Path(__file__).with_name("distributed_worker.py")
METHODS = ("corda_kpm", "corda_ipm", "cordapp", "milora")
# fp32 sums of a few hundred tokens, added in another order: relative error of a few ulp
STORE_RTOL = 1e-6


def torchrun(nproc: int, out: Path, reference: Path) -> None:
    env = {**os.environ, "OUT": str(out), "REFERENCE_STORE": str(reference), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    reference = root / "reference.safetensors"
    collect_covariances(tiny_llama(), text_batches(5), progress=False).save(reference)
    torchrun(1, root / "one", reference)
    torchrun(2, root / "two", reference)
    return root


def assert_same_store(got: CovarianceStore, want: CovarianceStore) -> None:
    assert got.inputs == want.inputs
    assert got.counts == want.counts
    assert set(got.sums) == set(want.sums)
    for key, tensor in want.sums.items():
        scale = tensor.abs().max()
        assert (got.sums[key] - tensor).abs().max() <= STORE_RTOL * scale, key
    assert got.fingerprint == want.fingerprint


def test_two_ranks_reduce_to_the_single_process_store(runs):
    want = collect_covariances(tiny_llama(), text_batches(5), splits=2, progress=False)
    for rank in (0, 1):
        assert_same_store(CovarianceStore.load(runs / "two" / f"rank{rank}" / "store.safetensors"), want)
    # the splits are dealt by global batch index: the same split stores whatever the rank count
    assert any("split1" in source for _, source in want.sums)


def test_ranks_that_saw_different_modalities_get_the_union(runs):
    want = collect_covariances(tiny_clip(), clip_batches(2), progress=False)
    for rank in (0, 1):
        assert_same_store(CovarianceStore.load(runs / "two" / f"rank{rank}" / "clip_store.safetensors"), want)


@pytest.mark.parametrize("method", METHODS)
def test_sharded_decomposition_is_bit_identical_on_every_rank_and_to_one_process(runs, method):
    one = load_file(str(runs / "one" / "rank0" / f"{method}.safetensors"))
    for rank in (0, 1):
        got = load_file(str(runs / "two" / f"rank{rank}" / f"{method}.safetensors"))
        assert set(got) == set(one)
        for name, tensor in one.items():
            assert torch.equal(got[name], tensor), (rank, name)


@pytest.mark.parametrize("build", ["sequential", "sequential_cordapp"])
def test_sequential_build_under_two_ranks_matches_one_process(runs, build):
    one = load_file(str(runs / "one" / "rank0" / f"{build}.safetensors"))
    ranks = [load_file(str(runs / "two" / f"rank{r}" / f"{build}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == one.keys() and all(ranks[0][n].shape == one[n].shape for n in one)  # same ranks
    for name, tensor in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    # each block's store was summed in another order, which may flip the sign of a singular pair:
    # compare what the model computes, B A and the residual weights, at fp32 decomposition accuracy
    for name in (n for n in one if n.endswith("lora_A.default.weight")):
        b_name = name.replace("lora_A", "lora_B")
        want, got = one[b_name] @ one[name], ranks[0][b_name] @ ranks[0][name]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    for name in (n for n in one if n.endswith("base_layer.weight")):
        assert (ranks[0][name] - one[name]).abs().max() <= 1e-5 * one[name].abs().max(), name


def test_a_failure_on_one_rank_raises_on_every_rank(runs):
    for stage, kind in (("calibration", "CalibrationError"), ("decomposition", "DecompositionError")):
        failed = (runs / "two" / "rank1" / f"{stage}_error.txt").read_text()
        other = (runs / "two" / "rank0" / f"{stage}_error.txt").read_text()
        assert other.startswith(f"{kind}: process 1 failed"), other
        assert failed.split(":")[0] in other
    assert not (runs / "one" / "rank0" / "decomposition_error.txt").exists()


def test_training_on_two_ranks_starts_from_rank_0_and_equals_one_process(runs):
    one = load_file(str(runs / "one" / "rank0" / "trained.safetensors"))
    ranks = [load_file(str(runs / "two" / f"rank{r}" / "trained.safetensors")) for r in (0, 1)]
    moved = False
    for name, tensor in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.allclose(ranks[0][name], tensor, rtol=1e-4, atol=1e-6), name
        moved |= "lora_B" in name and bool(tensor.abs().max() > 0)
    assert moved  # the steps really changed the adapter


def test_ranks_holding_different_models_are_refused(runs):
    for rank in (0, 1):
        assert "calibrated different models" in (runs / "two" / f"rank{rank}" / "fingerprint_error.txt").read_text()
    assert not (runs / "one" / "rank0" / "fingerprint_error.txt").exists()


def test_nested_main_first_blocks_release_the_others_only_after_the_outermost(runs):
    assert (runs / "two" / "rank1" / "nested.txt").read_text() == "True"


def test_owners_balance_the_cost_and_agree_everywhere():
    costs = {"a": 8.0, "b": 7.0, "c": 6.0, "d": 5.0, "e": 4.0}
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(dict(reversed(list(costs.items()))), 2)  # order of the dict does not matter
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in (0, 1)]
    assert sorted(loads) == [13.0, 17.0]  # LPT: 8 | 7, then 6 -> 7, 5 -> 8, 4 -> the tie's lower rank
    assert set(assign_owners(costs, 8).values()) == {0, 1, 2, 3, 4}
    assert decomposition_cost(4, [(2, 4)]) == 4**3 + 2 * 4 * 2


def test_one_process_is_a_no_op():
    assert world() == (0, 1)
    assert owned_keys({"x": [], "y": []}) == ["x", "y"]
