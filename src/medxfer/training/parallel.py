"""Data-parallel training of a whole network: DistributedDataParallel with BatchNorm
statistics synchronised over the workers (``medxfer.shard`` says which rows a worker takes).

Why synchronised statistics and not precise-BN alone: in training mode each BatchNorm layer
normalises with its batch's statistics, so workers that see B/N images each would train
another network than one process with batch B does; precise-BN (re-estimated after every
epoch, ``loop.reestimate_batchnorm``) fixes only the statistics used for evaluation. On CUDA
torch's ``SyncBatchNorm`` does it; it has no CPU kernels, so on CPUs (gloo) ``GlooBatchNorm``
sums each channel's count, sum and sum of squares over the workers with a differentiable
all-reduce, and autograd carries the gradient back through it.
"""

from __future__ import annotations

import torch
from torch import nn

from medxfer.errors import MedxferError
from medxfer.shard import Shard


class _SumOverWorkers(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduce of the gradient: each worker's sums
    feed every worker's loss."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class GlooBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the whole global batch (every
    worker's rows); in eval mode a plain BatchNorm. State-dict compatible with BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        xd = x.double()  # sums in float64: E[x^2] - E[x]^2 without cancellation
        count = torch.full((1,), x.numel() / max(c, 1), dtype=torch.float64)
        total = _SumOverWorkers.apply(torch.cat([xd.sum(dims), (xd * xd).sum(dims), count]))
        n = total[-1].clamp(min=1)
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0)
        shape = [1, c] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        y = (x - mean.to(x.dtype).view(shape)) * scale.to(x.dtype).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(n.detach()))
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """As torch's BatchNorm: unbiased variance; momentum None = cumulative average."""
        self.num_batches_tracked += 1
        factor = self.momentum
        if factor is None:
            factor = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / max(n - 1, 1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def synchronise_batchnorm(network: nn.Module, device: torch.device) -> nn.Module:
    """``network`` with every BatchNorm layer that trains synchronised over the workers, in
    place; parameters and statistics are the same objects, so an optimiser built before keeps
    working and a checkpoint loads unchanged. Layers of ``network.frozen`` (kept in eval mode
    by ``XrayClassifier.train``) stay as they are. A BatchNorm subclass that does more than
    normalise (timm's ``BatchNormAct2d``) is refused: a plain copy would drop its activation."""
    frozen = {id(m) for part in getattr(network, "frozen", []) for m in part.modules()}
    sync = nn.SyncBatchNorm if device.type == "cuda" else GlooBatchNorm

    def convert(module: nn.Module) -> None:
        for name, child in list(module.named_children()):
            if id(child) in frozen:
                continue
            if type(child) in PLAIN_NORMS:
                setattr(module, name, _copy(child, sync))
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, (GlooBatchNorm, nn.SyncBatchNorm)
            ):
                raise MedxferError(
                    f"--workers: {type(child).__name__} layers ({name}) cannot be synchronised "
                    "over workers; train this network in one process"
                )
            else:
                convert(child)

    convert(network)
    return network


def _copy(bn: nn.modules.batchnorm._BatchNorm, cls: type) -> nn.Module:
    sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        sync.weight, sync.bias = bn.weight, bn.bias
    if bn.track_running_stats:
        sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
        sync.num_batches_tracked = bn.num_batches_tracked
    sync.train(bn.training)
    return sync


def data_parallel(network: nn.Module, device: torch.device, shard: Shard) -> nn.Module:
    """The module a worker trains through: ``network`` (its BatchNorm synchronised) wrapped
    in DistributedDataParallel, which averages the gradients over the workers. Evaluation
    uses ``network`` itself, on one worker."""
    if not shard.distributed:
        return network
    synchronise_batchnorm(network, device)
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return nn.parallel.DistributedDataParallel(network, device_ids=ids)
