"""Where the repeated blocks of a model are: the unit the memory planner sizes and the
layer-sequential path calibrates one at a time."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from corda_vl.errors import CordaError
from corda_vl.targets import Target


def blocks_of(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module name -> its block: the child of the outermost ModuleList of two or more modules of
    one class that holds it ("model.layers.3"; the experts inside a MoE layer stay in their layer),
    or the module's own name outside every such list. The memory planner sizes these blocks."""
    lists = sorted((n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2
                    and len({type(c) for c in m}) == 1), key=len)
    out = {}
    for name in names:
        hits = [re.match(rf"({re.escape(p)}\.\d+)\.", name) for p in lists]
        out[name] = next((h.group(1) for h in hits if h), name)
    return out


def block_stack(model: nn.Module, targets: Sequence[Target]) -> tuple[str, nn.ModuleList, list[list[Target]]]:
    """(name, ModuleList, the targets of each block) of the repeated blocks holding every target
    (see :func:`blocks_of`); an error when the targets are spread over several stacks or lie
    outside them."""
    block_of = blocks_of(model, [t.name for t in targets])
    stacks = {block.rsplit(".", 1)[0] for block in block_of.values()}
    if any(block == name for name, block in block_of.items()) or len(stacks) != 1:
        groups = sorted({t.group for t in targets})
        raise CordaError(f"layer-sequential calibration needs every target inside one stack of repeated blocks, but "
                         f"the targets (groups {groups}) span several stacks or lie outside them. Adapt one stack at a "
                         f"time (e.g. groups=['language']) or use the all-at-once path (collect_covariances).")
    name = stacks.pop()
    stack = model.get_submodule(name)
    index = {f"{name}.{i}": i for i in range(len(stack))}
    members: list[list[Target]] = [[] for _ in stack]
    for t in targets:
        members[index[block_of[t.name]]].append(t)
    return name, stack, members
