import json

import numpy as np
import pytest
import torch

from medxfer.cli import main
from medxfer.similarity.measures import (
    frechet_distance,
    linear_cka,
    mean_pairwise_cosine,
    mean_pairwise_euclidean,
)
from tests.conftest import SHARED

NATURAL = SHARED / "natural"


def brute_force(x, y, dist, within=False):
    values = [
        dist(a, b) for i, a in enumerate(x) for j, b in enumerate(y) if not (within and i == j)
    ]
    return float(np.mean(values))


def euclid(a, b):
    return float(np.linalg.norm(a - b))


def cosine(a, b):
    return 1 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_eq9_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)) + 1
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    assert mean_pairwise_euclidean(tx, ty, block=3) == pytest.approx(brute_force(x, y, euclid))
    assert mean_pairwise_euclidean(tx, block=2) == pytest.approx(
        brute_force(x, x, euclid, within=True)
    )
    assert mean_pairwise_cosine(tx, ty) == pytest.approx(brute_force(x, y, cosine))
    assert mean_pairwise_cosine(tx) == pytest.approx(brute_force(x, x, cosine, within=True))


def test_repeated_vector_sets_have_distance_zero():
    v = torch.tensor([[3.0, -1.0, 2.0]])
    a, b = v.repeat(5, 1), v.repeat(8, 1)
    assert mean_pairwise_euclidean(a, b) == pytest.approx(0, abs=1e-6)
    assert mean_pairwise_cosine(a, b) == pytest.approx(0, abs=1e-12)


def test_identical_sets_give_fid_0_and_cka_1():
    x = torch.randn(50, 80)  # fewer samples than dimensions: singular covariance
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert linear_cka(x, x) == pytest.approx(1)
    assert frechet_distance(x, x + 1) == pytest.approx(80, rel=1e-6)  # mean shift only
    assert linear_cka(x, torch.randn(50, 80)) < 0.9


def test_fid_against_scipy_sqrtm():
    from scipy import linalg

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) * 1.5 + 0.3
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu = x.mean(0) - y.mean(0)
    expected = mu @ mu + np.trace(sx + sy - 2 * linalg.sqrtm(sx @ sy).real)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected)


@pytest.mark.integration
@pytest.mark.skipif(not NATURAL.is_dir(), reason="natural photos not present")
def test_similarity_command_on_real_images(small_kermany, tmp_path):
    out = tmp_path / "sim"
    code = main(
        [
            "similarity",
            "--arch",
            "mobilenet_v2",
            "--natural",
            str(NATURAL),
            "--medical",
            str(small_kermany),
            "--max-images",
            "16",
            "--image-size",
            "64",
            "--layers",
            "features.3",
            "features.18",
            "pooled",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads((out / "similarity.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["features.3", "features.18", "pooled"]
    assert result["n_natural"] == 16 and result["n_medical"] == 16
    for stage in result["stages"]:
        e = stage["pretrained"]["euclidean"]
        assert e["cross"] > 0 and e["natural"] > 0 and e["medical"] > 0
        assert stage["pretrained"]["fid"] > 0
    assert (out / "similarity.png").stat().st_size > 10_000


@pytest.mark.integration
@pytest.mark.skipif(not NATURAL.is_dir(), reason="natural photos not present")
def test_similarity_before_and_after_finetuning(small_kermany, tmp_path):
    from medxfer.config import RunConfig
    from medxfer.run.pipeline import train

    run = train(
        RunConfig(
            data=str(small_kermany),
            out=str(tmp_path / "ft"),
            mode="finetune",
            image_size=64,
            epochs=1,
            bootstrap=0,
        ),
        progress=False,
        log=lambda _: None,
    )
    out = tmp_path / "sim"
    assert (
        main(
            [
                "similarity",
                "--run",
                str(run),
                "--natural",
                str(NATURAL),
                "--medical",
                str(small_kermany),
                "--max-images",
                "12",
                "--layers",
                "features.18",
                "pooled",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((out / "similarity.json").read_text())
    assert result["arch"] == "mobilenet_v2" and result["image_size"] == 64
    for stage in result["stages"]:
        cka = stage["cka_pretrained_vs_finetuned"]
        assert 0 < cka["natural"] <= 1 and 0 < cka["medical"] <= 1
        # fine-tuning moved the weights, so the features differ from the pretrained ones
        assert stage["finetuned"]["fid"] != pytest.approx(stage["pretrained"]["fid"])
    assert set(result["proposition_5"]) >= {"holds_raw", "holds_relative", "holds_fid"}
