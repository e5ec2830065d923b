"""GPT-2-style decoder-only language models, whose projections are transformers ``Conv1D`` layers
(weights stored as (d_in, d_out); PEFT adapts them with ``fan_in_fan_out``).

Recognised by structure: blocks ``h.N`` holding ``attn.c_attn`` as a Conv1D. Groups: ``language``
(default): ``attn.c_attn`` / ``attn.c_proj`` / ``mlp.c_fc`` / ``mlp.c_proj`` of every block;
``head``: the LM head, opt-in and an ``nn.Linear``, so it cannot share one adapter with the
Conv1D layers (adapt it in a separate adapter). Padding is excluded through the attention mask.
"""

from __future__ import annotations

from corda_vl.families.base import Family, has_module, is_vision_language, register_family, text_probe
from corda_vl.families.llama import causal_lm_forward, prepare_text, text_route
from corda_vl.layers import is_conv1d


def _detect(model) -> bool:
    if is_vision_language(model) or not has_module(model, r"(^|\.)h\.\d+\.attn\.c_attn$"):
        return False
    return any(is_conv1d(m) for name, m in model.named_modules() if name.endswith("attn.c_attn"))


GPT2 = register_family(
    Family(
        name="gpt2",
        detect=_detect,
        groups={"language": r"(^|\.)h\.\d+\.(attn\.c_(attn|proj)|mlp\.c_(fc|proj))$", "head": r"(^|\.)lm_head$"},
        default_groups=("language",),
        route=text_route,
        forward=causal_lm_forward,
        prepare=prepare_text,
        task_type="CAUSAL_LM",
        describe=lambda name, group: "LM head input (text tokens)" if group == "head" else "text tokens",
        probe_batch=lambda model: text_probe(),
    )
)
