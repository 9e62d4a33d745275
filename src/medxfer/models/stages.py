"""The ordered stages of a backbone: the units that ``partial`` mode unfreezes and that the
feature-similarity measurements tap."""

from __future__ import annotations

import functools

import torch
from torch import nn

EXPANDED = {"features", "blocks", "stages", "layers"}
SKIPPED = {"AuxLogits"}


TOKEN_STAGES = 4  # a transformer's blocks, grouped into this many stages of equal length


class StageGroup(nn.Sequential):
    """Consecutive transformer blocks counted as one stage (a view: the blocks stay where they
    are in the network); its output is its last block's (:func:`stage_output`)."""


def stage_output(module: nn.Module) -> nn.Module:
    """The module whose forward output is the stage's output (to hook)."""
    return module[-1] if isinstance(module, StageGroup) else module


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameterised children of the backbone in forward order, with the usual containers
    (``features``, ``blocks``, ``stages``, ``layers``) opened one level, and a lone wrapper
    opened until there is more than one unit. A transformer's ``blocks`` become
    ``TOKEN_STAGES`` groups, each named after its last block."""
    prefix, body = "", backbone
    while True:
        units = [(n, m) for n, m in body.named_children() if n not in SKIPPED and _has_params(m)]
        if len(units) == 1 and any(True for _ in units[0][1].children()):
            prefix, body = f"{prefix}{units[0][0]}.", units[0][1]
            continue
        break
    stages: list[tuple[str, nn.Module]] = []
    tokens = hasattr(body, "patch_embed")
    for name, module in units:
        if name in EXPANDED and isinstance(module, (nn.Sequential, nn.ModuleList)):
            found = [
                (f"{prefix}{name}.{n}", m) for n, m in module.named_children() if _has_params(m)
            ]
            stages += _grouped(found) if tokens and name == "blocks" else found
        else:
            stages.append((f"{prefix}{name}", module))
    return stages


def _grouped(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    size = max(1, -(-len(blocks) // TOKEN_STAGES))
    groups = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    return [(group[-1][0], StageGroup(*(m for _, m in group))) for group in groups]


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
        modules = dict(backbone_stages(network))
        for name in self.names:  # a partial of a method: a deepcopy taps its own copy
            tapped = stage_output(modules[name])
            tapped.register_forward_hook(functools.partial(self._keep, name))
        self._taps: dict[str, torch.Tensor] = {}
        self.num_features = self._width(probe_size)

    def extra_repr(self) -> str:
        return ", ".join(self.names)

    def _keep(self, name: str, _module, _inputs, output) -> None:
        self._taps[name] = output

    def forward(self, x: torch.Tensor):
        out = self.network(x)
        pooled = torch.cat([pool_output(self._taps[name]) for name in self.names], dim=1)
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


def pool_output(output: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B, C); (B, N, C) tokens -> (B, C)."""
    return output.mean(dim=(2, 3)) if output.ndim == 4 else output.mean(dim=1)


class TokenPooling(nn.Module):
    """A timm transformer's tokens (after its final norm) pooled into one feature vector: by
    the model's own head pooling (``None``: the class token for ViT and DINOv2, fc_norm and
    the average for BEiT or models without a class token), ``cls`` (the class token),
    ``mean`` (the mean of the patch tokens) or ``both`` (cls and mean concatenated, the DINOv2
    linear probe's input)."""

    def __init__(self, network: nn.Module, pool: str | None) -> None:
        super().__init__()
        self.network, self.pool = network, pool
        width = network.num_features
        self.num_features = 2 * width if pool == "both" else width

    def extra_repr(self) -> str:  # part of the exported graph's identity (engine.graph_key)
        return f"pool={self.pool or 'own'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.network.forward_features(x)
        if self.pool is None:  # the model's own pooling (class token, or fc_norm + average)
            return self.network.forward_head(tokens, pre_logits=True)
        cls = tokens[:, 0]
        mean = tokens[:, self.network.num_prefix_tokens :].mean(dim=1)
        if self.pool == "cls":
            return cls
        return mean if self.pool == "mean" else torch.cat([cls, mean], dim=1)
