"""The inputs stage: adapt frozen BatchNorm statistics (``--bn adapt``), then what the loop
trains on: cached backbone features of clean and augmented views (frozen backbones) or images."""

from __future__ import annotations

import time

import torch

from medxfer.classification.context import Context, Inputs
from medxfer.data.augment import TTA_VIEWS, get_augmentation
from medxfer.data.cache import DECODER_VERSION
from medxfer.data.prepared import PreparedData
from medxfer.device import Runtime
from medxfer.engine import GRAPH_VERSION, make_engine
from medxfer.models.classifier import XrayClassifier
from medxfer.models.factory import weights_digest
from medxfer.training.features import (
    FeatureCache,
    View,
    adapt_batchnorm,
    chunk_seed,
    extract_features,
    frozen_norms,
)
from medxfer.training.loop import (
    FeatureSource,
    ImageSource,
)


def prepare_inputs(ctx: Context, network: XrayClassifier, adapted: bool) -> Inputs:
    """Adapt frozen BatchNorm statistics (``--bn adapt``), then the training source: cached
    backbone features when the backbone is frozen, images otherwise."""
    cfg, data, runtime = ctx.cfg, ctx.data, ctx.runtime
    if cfg.bn == "adapt" and cfg.model_spec.has_frozen_layers and not adapted:
        _adapt(network, data, runtime)
    augmentation = get_augmentation(cfg.augment)
    if not cfg.uses_feature_cache:
        source = ImageSource(
            network,
            data.pixels,
            runtime.device,
            augmentation,
            seed=cfg.seed,
            eval_batch_size=runtime.batch_size,
            eval_views=cfg.tta,
        )
        return Inputs(source)
    started = time.perf_counter()
    seconds = {"augment": 0.0, "forward": 0.0}
    clean, clean_idx, views, tta = _cached_features(ctx, network, augmentation, seconds)
    source = FeatureSource(
        network.head,
        clean,
        clean_idx,
        views=views,
        train_index=data.splits["train"],
        device=runtime.device,
        seed=cfg.seed,
        tta=tta,
    )
    return Inputs(source, {"features": time.perf_counter() - started, **seconds})


# -- helpers --------------------------------------------------------------------------------
def _adapt(network: XrayClassifier, data: PreparedData, runtime: Runtime) -> None:
    """``--bn adapt``: the frozen layers' BatchNorm statistics from every training pixel."""
    norms = frozen_norms(network)
    network.eval()
    batches = (data.pixels[chunk] for chunk in data.splits["train"].split(runtime.batch_size))
    from medxfer.device import to_input

    with torch.inference_mode():
        adapt_batchnorm(
            norms,
            lambda pixels: network.features(to_input(pixels, runtime.device)),
            batches,
        )


def _cached_features(ctx: Context, network: XrayClassifier, augmentation, seconds: dict):
    """Clean features of val/test (and train when not augmenting), and K augmented views of
    train, from the feature cache."""
    cfg, data, runtime = ctx.cfg, ctx.data, ctx.runtime
    cache = FeatureCache(ctx.cache_dir, runtime.shard, runtime.batch_size)
    base = feature_key(ctx)
    engine = make_engine(runtime.engine, network, ctx.cache_dir)
    train_idx = data.splits["train"]
    # With augmentation, training reads only augmented views: the clean view is needed for
    # evaluation alone, which saves one backbone pass over the training images.
    clean_idx = torch.cat([data.splits[s] for s in ("val", "test") if s in data.splits])
    if augmentation is None:
        clean_idx = torch.cat([train_idx, clean_idx])
    dim = network.num_features

    def filler(index: torch.Tensor, view_of):
        """What fills a cache entry: the features of ``index``'s rows in chunk c's view."""
        return lambda rows, chunk: extract_features(
            network,
            data.pixels,
            index[rows.start : rows.stop],
            runtime,
            view_of(chunk),
            engine=engine,
            seconds=seconds,
            shard=runtime.shard,
        )

    clean_key = {**base, "view": "clean", "dtype": "float32", "rows": data.index_key(clean_idx)}
    clean = cache.get(clean_key, (len(clean_idx), dim), filler(clean_idx, lambda _c: View()))
    tta = [  # --tta: the fixed test-time views after the identity
        cache.get(
            {**clean_key, "tta": TTA_VIEWS[k]},
            (len(clean_idx), dim),
            filler(clean_idx, lambda _c, k=k: View(tta=k)),
        )
        for k in range(1, cfg.tta)
    ]
    if augmentation is None:
        return clean, clean_idx, None, tta
    views = []
    for v in range(cfg.views):
        key = {
            **base,
            "view": v,
            "augment": augmentation.describe(),
            "seed": cfg.seed,
            "dtype": str(runtime.amp or "float32"),
            "rows": data.index_key(train_idx),
        }
        seeded = filler(
            train_idx, lambda c, v=v: View(augmentation, chunk_seed(cfg.seed * 1000 + v, c))
        )
        views.append(cache.get(key, (len(train_idx), dim), seeded))
    return clean, clean_idx, views, tta


def feature_key(ctx: Context) -> dict:
    """Everything that changes a backbone feature, so a shared cache never serves features
    made under other settings."""
    import timm
    import torchvision

    cfg = ctx.cfg
    key = {
        "arch": cfg.arch,
        "weights": weights_digest(cfg.model_spec),
        "bn": cfg.bn,
        "normalize": cfg.normalize,
        "resolution": cfg.resolution,
        "color": ctx.data.color,
        "decoder": DECODER_VERSION,
        "libraries": [torch.__version__, torchvision.__version__, timm.__version__],
        "device": ctx.runtime.device.type,
        "engine": ctx.runtime.engine,
    }
    if ctx.runtime.engine == "onnxruntime":  # its kernels and our export shape the features
        import onnxruntime

        key["libraries"].append(f"onnxruntime {onnxruntime.__version__}")
        key["graph"] = GRAPH_VERSION
    if cfg.features != "last":  # absent for the last stage: earlier caches stay valid
        key["features"] = cfg.features
    if cfg.pool is not None:  # transformers: which tokens make the feature
        key["pool"] = cfg.pool
    if cfg.bn == "adapt":
        key["adapted_on"] = ctx.data.index_key(ctx.data.splits["train"])
    return key
