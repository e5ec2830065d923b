"""The retention dial: evaluate a trained adapter at a fraction t of what training changed.

WiSE-FT interpolates weights between the model before and after fine-tuning,
``W(t) = W + t (W_trained - W)``. For a plain LoRA (B0 = 0) that is PEFT's
``rescale_adapter_scale(model, t)``. For CorDA and PiSSA it is *not*: their base holds the
residual ``W_res = W - s B0 A0``, so scaling the adapter by t = 0 would give ``W_res``, a model
that was never the original. Here::

    W(t) = W_res + s (1 - t) B0 A0 + s t B A  =  W + t s (B A - B0 A0)

which is exactly ``rescale_adapter_scale`` applied to :func:`corda_vl.export_lora`'s plain LoRA on
the original base (a test checks that equality), without writing or reloading anything.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from peft.tuners.lora import LoraLayer

from corda_vl.errors import CordaError


def _lora_layers(peft_model) -> dict[str, LoraLayer]:
    layers = {name: m for name, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        raise CordaError("adapter scaling needs a PEFT model with LoRA layers (build_corda returns one).")
    return layers


def initial_factors(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (A0, B0)} of the active adapter, copied to CPU: call right after the build,
    before training, and pass the result to :func:`adapter_scale`."""
    out = {}
    for name, layer in _lora_layers(peft_model).items():
        adapter = peft_model.active_adapter
        out[name] = (layer.lora_A[adapter].weight.detach().cpu().clone(),
                     layer.lora_B[adapter].weight.detach().cpu().clone())
    return out


@contextlib.contextmanager
def adapter_scale(peft_model, initial: dict[str, tuple[torch.Tensor, torch.Tensor]], t: float) -> Iterator[None]:
    """Inside the block the model computes with ``W + t * (W_trained - W)`` in every adapted layer
    (t = 0: the original model, t = 1: the trained one). Weights and scalings are restored after,
    also on error. Costs one copy of each adapted base weight whose initial adapter is non-zero."""
    if not isinstance(t, (int, float)):
        raise CordaError(f"adapter_scale: t must be a number, got {t!r}.")
    layers = _lora_layers(peft_model)
    missing = sorted(set(layers) - set(initial))
    if missing:
        raise CordaError(f"adapter_scale: no initial factors for {missing[:3]}; pass initial_factors(model) "
                         "taken right after build_corda.")
    adapter = peft_model.active_adapter
    saved_weights, saved_scaling = {}, {}
    try:
        for name, layer in layers.items():
            s = layer.scaling[adapter]
            saved_scaling[name] = s
            a0, b0 = initial[name]
            if b0.any() and a0.any() and t != 1:
                weight = layer.get_base_layer().weight
                saved_weights[name] = weight.detach().clone()
                delta = (b0.double() @ a0.double()) * (s * (1 - t))
                if getattr(layer, "fan_in_fan_out", False):
                    delta = delta.T
                with torch.no_grad():
                    weight.add_(delta.to(device=weight.device, dtype=weight.dtype))
            layer.scaling[adapter] = s * t
        yield
    finally:
        for name, layer in layers.items():
            if name in saved_weights:
                with torch.no_grad():
                    layer.get_base_layer().weight.copy_(saved_weights[name])
            if name in saved_scaling:
                layer.scaling[adapter] = saved_scaling[name]


@torch.no_grad()
def update_size(peft_model, initial: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """How far training moved the adapted layers from the original model:
    ``{"fro": ||ΔW||_F, "relative": ||ΔW||_F / ||W||_F}`` over every adapted layer together, where
    ``ΔW = s (B A - B0 A0)`` per layer (the trained model against the original base, zero at
    init for every method) and ``W`` is the original weight ``W_res + s B0 A0``. A larger update
    both learns more and forgets more, so retention is compared against it."""
    layers = _lora_layers(peft_model)
    adapter = peft_model.active_adapter
    delta_sq = base_sq = 0.0
    for name, layer in layers.items():
        s = float(layer.scaling[adapter])
        a, b = layer.lora_A[adapter].weight.double().cpu(), layer.lora_B[adapter].weight.double().cpu()
        a0, b0 = (x.double() for x in initial[name])
        initial_product = b0 @ a0
        delta_sq += float(((b @ a - initial_product) * s).square().sum())
        weight = layer.get_base_layer().weight.double().cpu()
        if getattr(layer, "fan_in_fan_out", False):
            weight = weight.T
        base_sq += float((weight + s * initial_product).square().sum())
    fro = delta_sq ** 0.5
    return {"fro": fro, "relative": fro / base_sq ** 0.5 if base_sq else float("nan")}
