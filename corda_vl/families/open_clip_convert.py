"""Make open_clip's attention and projections reachable by hooks and PEFT, and undo it.

open_clip ViTs use ``nn.MultiheadAttention``: q/k/v live in one fused ``in_proj_weight`` and
``out_proj`` is read as a weight, never *called*, so forward hooks and PEFT LoRA layers never
see it (PEFT issue 761). ``convert_open_clip`` replaces each one with :class:`ExplicitAttention`
(four ``nn.Linear``, same maths), and the bare projection Parameters (``visual.proj``,
``text_projection``) with :class:`MatmulProjection` (an ``nn.Linear`` that open_clip's own
``x @ proj`` reaches through ``__rmatmul__``). ``to_open_clip_state_dict`` goes back: fused
attention, Parameter projections, LoRA adapters merged, under open_clip's own key names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from corda_vl.errors import CordaError


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` with explicit q/k/v/out ``nn.Linear`` modules (same outputs)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if mha.bias_k is not None or mha.add_zero_attn:
            raise CordaError("open_clip attention with bias_k/add_zero_attn cannot be converted; "
                             "exclude that module or use a model without it.")
        e, heads = mha.embed_dim, mha.num_heads
        self.num_heads, self.batch_first, self.dropout = heads, mha.batch_first, mha.dropout
        bias = mha.in_proj_bias is not None
        self.q_proj = nn.Linear(e, e, bias=bias)
        self.k_proj = nn.Linear(mha.kdim, e, bias=bias)
        self.v_proj = nn.Linear(mha.vdim, e, bias=bias)
        self.out_proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                q, k, v = mha.in_proj_weight.chunk(3)
            else:
                q, k, v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for linear, weight in zip((self.q_proj, self.k_proj, self.v_proj), (q, k, v)):
                linear.weight.copy_(weight)
            if bias:
                for linear, b in zip((self.q_proj, self.k_proj, self.v_proj), mha.in_proj_bias.chunk(3)):
                    linear.bias.copy_(b)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, H, L, E/H)
        b, length, e = x.shape
        return x.view(b, length, self.num_heads, e // self.num_heads).transpose(1, 2)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None,
                key_padding_mask=None, **_):
        if need_weights:
            raise CordaError("ExplicitAttention does not return attention weights (open_clip never asks).")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _merge_masks(attn_mask, key_padding_mask, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        return (out if self.batch_first else out.transpose(0, 1)), None


def _merge_masks(attn_mask, key_padding_mask, dtype):
    """One additive float mask broadcastable to (B, H, Lq, Lk), as nn.MultiheadAttention reads them."""
    def additive(mask):
        if mask is None or mask.dtype != torch.bool:
            return mask.to(dtype) if mask is not None else None
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))

    mask = additive(attn_mask)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


class MatmulProjection(nn.Module):
    """A projection Parameter P (in x out) as ``linear`` (weight = P^T); ``x @ self`` calls it."""

    def __init__(self, proj: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(proj.shape[0], proj.shape[1], bias=False, device=proj.device, dtype=proj.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(proj.T)

    def forward(self, x):
        return self.linear(x)

    def __rmatmul__(self, x):  # open_clip computes `pooled @ self.proj`
        return self.linear(x)


def _towers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    towers = [("visual.transformer", getattr(getattr(model, "visual", None), "transformer", None)),
              ("transformer", getattr(model, "transformer", None))]
    return [(name, tower) for name, tower in towers if isinstance(tower, nn.Module)]


def is_converted(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.MultiheadAttention) for _, tower in _towers(model) for m in tower.modules())


def convert_open_clip(model: nn.Module) -> nn.Module:
    """Convert in place (and return) an open_clip CLIP so that every attention and projection
    is a called ``nn.Linear``. Raises CordaError for towers it cannot reach."""
    if not hasattr(model, "encode_image") or not hasattr(model, "visual"):
        raise CordaError(f"{type(model).__name__} is not an open_clip CLIP model (no visual / encode_image).")
    towers = _towers(model)
    if not towers:
        raise CordaError(f"{type(model).__name__} has neither a ViT image tower nor open_clip's own text "
                         f"transformer (model.transformer); its towers cannot be converted.")
    for _, tower in towers:  # a ResNet / timm image tower has no nn.MultiheadAttention to convert
        for parent in list(tower.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.MultiheadAttention):
                    setattr(parent, child_name, ExplicitAttention(child))
    for owner, attr in ((model.visual, "proj"), (model, "text_projection")):
        value = getattr(owner, attr, None)
        if isinstance(value, nn.Parameter):
            del owner._parameters[attr]
            setattr(owner, attr, MatmulProjection(value.detach()))
    return model


def _merged(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of a Linear or of a PEFT LoRA layer with its active adapters merged."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    weight = base.weight.detach().clone()
    for adapter in getattr(module, "active_adapters", []):
        if adapter in getattr(module, "lora_A", {}):
            weight += module.get_delta_weight(adapter).to(weight.dtype)
    return weight, (base.bias.detach().clone() if base.bias is not None else None)


def to_open_clip_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain open_clip state dict (fused attention, Parameter projections, adapters merged)
    from a converted model, with or without PEFT around it; load it into a stock open_clip CLIP."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handled: dict[str, torch.Tensor] = {}
    prefixes: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(p) for p in prefixes):  # inside a module already written out
            continue
        if isinstance(module, ExplicitAttention):
            parts = [_merged(getattr(module, p)) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            handled[f"{name}.in_proj_weight"] = torch.cat([w for w, _ in parts[:3]])
            if parts[0][1] is not None:
                handled[f"{name}.in_proj_bias"] = torch.cat([b for _, b in parts[:3]])
            handled[f"{name}.out_proj.weight"] = parts[3][0]
            if parts[3][1] is not None:
                handled[f"{name}.out_proj.bias"] = parts[3][1]
            prefixes.append(name + ".")
        elif isinstance(module, MatmulProjection):
            handled[name] = _merged(module.linear)[0].T.contiguous()
            prefixes.append(name + ".")
        elif hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
            weight, bias = _merged(module)
            handled[f"{name}.weight"] = weight
            if bias is not None:
                handled[f"{name}.bias"] = bias
            prefixes.append(name + ".")
    state = {k: v for k, v in base.state_dict().items() if not any(k.startswith(p) for p in prefixes)}
    state.update(handled)
    return state
