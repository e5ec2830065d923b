"""Targets from a config: per-group and per-module settings must name something adapted."""

import pytest
from conftest import tiny_llama, tiny_llava

from corda_vl import CordaConfig, build_corda, plan
from corda_vl.errors import TargetError
from corda_vl.families.base import detect_family
from corda_vl.targets import config_targets


@pytest.mark.parametrize("changes, message", [
    ({"group_modes": {"langauge": "ipm"}}, r"group_modes names group\(s\) \['langauge'\] .* adapted groups are \['language'\]"),
    ({"groups": ["language"], "group_ranks": {"vision": 8}}, r"group_ranks names group\(s\) \['vision'\]"),
    ({"rank_pattern": {"qproj": 2}}, r"rank_pattern key\(s\) \['qproj'\] match no adapted module"),
    ({"alpha_pattern": {"k_proj": 2.0}, "target_modules": ["q_proj"]}, r"alpha_pattern key\(s\) \['k_proj'\]"),
])
def test_a_key_that_matches_nothing_is_refused_before_any_work(changes, message):
    model = tiny_llama() if "vision" not in str(changes) else tiny_llava()
    config = CordaConfig(method="lora", r=4, **changes)
    with pytest.raises(TargetError, match=message):
        build_corda(model, None, config, progress=False)
    with pytest.raises(TargetError, match=message):
        plan(model, config)


def test_keys_that_match_are_accepted():
    model = tiny_llama()
    config = CordaConfig(method="lora", r=4, rank_pattern={"q_proj": 2, "layers.0.mlp.down_proj": 3},
                         alpha_pattern={"v_proj": 8.0}, group_ranks={"language": 4})
    targets = config_targets(model, detect_family(model), config)
    assert {t.group for t in targets} == {"language"}
