"""The ordered stages of a backbone: the units that ``partial`` mode unfreezes and that the
feature-similarity measurements tap."""

from __future__ import annotations

from torch import nn

EXPANDED = {"features", "blocks", "stages", "layers"}
SKIPPED = {"AuxLogits"}


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameterised children of the backbone in forward order, with the usual containers
    (``features``, ``blocks``, ``stages``, ``layers``) opened one level, and a lone wrapper
    opened until there is more than one unit."""
    prefix, body = "", backbone
    while True:
        units = [(n, m) for n, m in body.named_children() if n not in SKIPPED and _has_params(m)]
        if len(units) == 1 and len(list(units[0][1].children())) > 1:
            prefix, body = f"{prefix}{units[0][0]}.", units[0][1]
            continue
        break
    stages: list[tuple[str, nn.Module]] = []
    for name, module in units:
        if name in EXPANDED and isinstance(module, (nn.Sequential, nn.ModuleList)):
            stages += [
                (f"{prefix}{name}.{n}", m) for n, m in module.named_children() if _has_params(m)
            ]
        else:
            stages.append((f"{prefix}{name}", module))
    return stages


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
