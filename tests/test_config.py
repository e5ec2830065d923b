"""CordaConfig refuses numbers that would build a broken or silently different adapter."""

import math

import pytest

from corda_vl import CordaConfig, CordaError


@pytest.mark.parametrize("changes, message", [
    ({"alpha": math.nan}, "alpha=nan must be a finite positive number"),
    ({"alpha": math.inf}, "alpha=inf must be a finite positive number"),
    ({"alpha": -1.0}, "alpha=-1.0 must be a finite positive number"),
    ({"lora_dropout": -0.1}, r"lora_dropout=-0.1 must be in \[0, 1\)"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0 must be in \[0, 1\)"),
    ({"damping": (1e-4, math.nan)}, "must be a non-empty ascending list of finite lam"),
    ({"damping": (1e-4, math.inf)}, "must be a non-empty ascending list of finite lam"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern \{'q_proj': 0\}: ranks must be positive integers"),
    ({"rank_pattern": {"q_proj": 2.5}}, "ranks must be positive integers"),
    ({"alpha_pattern": {"q_proj": math.nan}}, "alphas must be finite positive numbers"),
    ({"method": "corda++", "compactness": "paper", "mode": "ipm"}, "compactness='paper' is the paper's KPM"),
    ({"method": "corda++", "compactness_spectrum": "both"}, "compactness_spectrum='both'"),
])
def test_bad_numbers_are_refused_with_the_rule(changes, message):
    with pytest.raises(CordaError, match=message):
        CordaConfig(**changes)


def test_good_numbers_pass():
    config = CordaConfig(alpha=16, lora_dropout=0.05, damping=(0.0, 1e-2), rank_pattern={"q_proj": 2},
                         alpha_pattern={"q_proj": 4.0})
    assert config.damping == (0.0, 0.01)


def test_the_default_damping_starts_at_1e_2_for_every_model():
    # chosen by the retention studies (docs/maths.md#kpm-needs-damping): 1e-4 let KPM's A factor
    # grow by up to 1/lam and forget more, on CLIP and on SmolLM2 alike
    assert CordaConfig().damping == (1e-2, 1e-1, 1.0)
    assert CordaConfig(mode="kpm").damping[0] >= 1e-2
