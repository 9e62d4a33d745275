"""The ordered stages of a backbone: the units that ``partial`` mode unfreezes and that the
feature-similarity measurements tap."""

from __future__ import annotations

import functools

import torch
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


class StagePooling(nn.Module):
    """``--features stages``: the globally average-pooled outputs of the network's last
    ``count`` stages, concatenated (medical images often carry more in mid-level features than
    in ImageNet's last layer). The last stage's pooled output is the usual feature vector."""

    def __init__(self, network: nn.Module, count: int = 3, probe_size: int = 96) -> None:
        super().__init__()
        self.network = network
        self.names = [name for name, _ in backbone_stages(network)[-count:]]
        modules = dict(network.named_modules())
        for name in self.names:  # a partial of a method: a deepcopy taps its own copy
            modules[name].register_forward_hook(functools.partial(self._keep, name))
        self._taps: dict[str, torch.Tensor] = {}
        self.num_features = self._width(probe_size)

    def _keep(self, name: str, _module, _inputs, output) -> None:
        self._taps[name] = output

    def forward(self, x: torch.Tensor):
        out = self.network(x)
        pooled = torch.cat([_pool(self._taps[name]) for name in self.names], dim=1)
        self._taps = {}
        return (pooled, out[1]) if isinstance(out, tuple) else pooled

    @torch.no_grad()
    def _width(self, size: int) -> int:
        training = self.network.training
        self.network.eval()
        try:
            return int(self(torch.zeros(1, 3, size, size)).shape[1])
        finally:
            self.network.train(training)


def _pool(output: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B, C); (B, N, C) tokens -> (B, C)."""
    return output.mean(dim=(2, 3)) if output.ndim == 4 else output.mean(dim=1)
