import json
import shutil

import numpy as np
import pytest
import torch

from medxfer.cli import main
from medxfer.config import RunConfig
from medxfer.models.factory import ModelSpec, create_model, weights_digest
from medxfer.similarity.compare import baseline_spec
from medxfer.similarity.features import gray_batches, rgb_batches, stage_features
from medxfer.similarity.measures import (
    frechet_distance,
    linear_cka,
    mean_pairwise_cosine,
    mean_pairwise_euclidean,
)
from medxfer.similarity.sampling import stratified_sample
from tests.conftest import KERMANY, SHARED

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
    args = [
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
    assert main(args) == 0
    result = json.loads((out / "similarity.json").read_text())
    assert [s["stage"] for s in result["stages"]] == ["features.3", "features.18", "pooled"]
    assert result["n_natural"] == 16 and result["n_medical"] == 16
    # 16 of 10 + 10 test images: a stratified sample takes 8 of each class, recorded by file
    sampling = result["sampling"]
    assert sampling["seed"] == 0 and sampling["medical_per_class"] == {"NORMAL": 8, "PNEUMONIA": 8}
    test_files = {str(f) for f in (small_kermany / "test").rglob("*.jpeg")}
    assert (
        len(set(sampling["medical_files"])) == 16 and set(sampling["medical_files"]) <= test_files
    )
    photos = sorted(p for p in NATURAL.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(set(sampling["natural_files"])) == 16
    assert sampling["natural_files"] != [str(p) for p in photos[:16]]  # not the first 16 files
    # the same seed draws the same files, another seed other ones
    again = tmp_path / "again"
    assert main([*args[:-3], "--out", str(again), "--quiet", "--layers", "pooled"]) == 0
    assert json.loads((again / "similarity.json").read_text())["sampling"] == sampling
    other = tmp_path / "other"
    assert (
        main([*args[:-3], "--out", str(other), "--quiet", "--layers", "pooled", "--seed", "1"]) == 0
    )
    other_sampling = json.loads((other / "similarity.json").read_text())["sampling"]
    assert other_sampling["natural_files"] != sampling["natural_files"]
    assert other_sampling["medical_files"] != sampling["medical_files"]
    for stage in result["stages"]:
        e = stage["pretrained"]["euclidean"]
        assert e["cross"] > 0 and e["natural"] > 0 and e["medical"] > 0
        assert stage["pretrained"]["fid"] > 0
    assert (out / "similarity.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def finetuned_run(small_kermany, tmp_path_factory):
    from medxfer.classification.run import train
    from medxfer.config import RunConfig

    return train(
        RunConfig(
            data=str(small_kermany),
            out=str(tmp_path_factory.mktemp("runs") / "ft"),
            mode="finetune",
            image_size=64,
            epochs=1,
            bootstrap=0,
        ),
        progress=False,
        log=lambda _: None,
    )


@pytest.mark.integration
@pytest.mark.skipif(not NATURAL.is_dir(), reason="natural photos not present")
def test_similarity_before_and_after_finetuning(finetuned_run, small_kermany, tmp_path):
    out = tmp_path / "sim"
    assert (
        main(
            [
                "similarity",
                "--run",
                str(finetuned_run),
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


def _edit_run_config(run, dest, **changes):
    """A copy of a run whose config.json and model.pt say ``changes``."""
    shutil.copytree(run, dest)
    config = json.loads((dest / "config.json").read_text())
    config["run"].update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    saved = torch.load(dest / "model.pt", weights_only=False)
    saved["options"].update(changes)  # model.pt format 3
    torch.save(saved, dest / "model.pt")
    return dest


@pytest.mark.integration
def test_similarity_refuses_a_scratch_run(finetuned_run, small_kermany, tmp_path, capsys):
    run = _edit_run_config(finetuned_run, tmp_path / "scratch", mode="scratch")
    argv = ["similarity", "--run", str(run), "--natural", str(NATURAL)]
    code = main([*argv, "--medical", str(small_kermany), "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"medxfer: error: run {run} was trained from scratch: it has no pretrained backbone "
        "to compare against"
    )
    assert not (tmp_path / "s").exists()


def test_pretrained_baseline_is_the_runs_own_spec_in_transfer_mode(tmp_path):
    """A run's weight options (tag, file, normalisation) reach its pretrained baseline."""
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    cfg = RunConfig(
        data="d",
        out="o",
        arch="mobilenet_v2",
        mode="finetune",
        normalize="imagenet",
        weights=str(weights),
        weights_tag="IMAGENET1K_V2",
    )
    spec = baseline_spec(cfg, tmp_path)
    assert spec.mode == "transfer" and spec.arch == "mobilenet_v2"
    assert spec.weights_tag == "IMAGENET1K_V2" and spec.weights == str(weights)
    assert spec.normalization == "imagenet"
    # the weights it loads are the run's, as the feature cache identifies them
    assert weights_digest(spec) == weights_digest(cfg.model_spec)
    tagged = RunConfig(data="d", out="o", mode="partial", weights_tag="IMAGENET1K_V2")
    assert weights_digest(baseline_spec(tagged, tmp_path)) == "mobilenet_v2-7ebf99e0.pth"


@pytest.mark.parametrize("domain", ["gray", "rgb"])
def test_stage_features_feeds_the_model_on_its_own_device(domain):
    """CPU images must reach a model on another device there (on CUDA this crashed in
    GrayToRGB). The meta device stands in for a GPU: any CPU tensor meeting it raises."""
    model = create_model(ModelSpec("mobilenet_v2", mode="scratch"))
    device = torch.device("meta")
    seen = []
    for module in (model.prep, model.backbone):
        module.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].device))
    if domain == "gray":
        pixels = torch.randint(0, 256, (5, 32, 32), dtype=torch.uint8)
        batches = gray_batches(model, pixels, 2)
    else:
        pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
        batches = rgb_batches(model, pixels, 2)
    names = ["features.3", "pooled"]
    features = stage_features(model, batches, names, device)
    assert {f.device for f in features.values()} == {device}
    assert features["features.3"].shape == (5, 24) and features["pooled"].shape == (5, 1280)
    assert len(seen) == (6 if domain == "gray" else 3) and set(seen) == {device}


def test_stratified_sample_of_the_kermany_test_split():
    """20 of Kermany's 234 NORMAL + 390 PNEUMONIA test images: 7.5 and 12.5 expected."""
    labels = [c.name for c in sorted((KERMANY / "test").iterdir()) for _ in c.iterdir()]
    if not labels:
        pytest.skip("Kermany not present")
    counts = {c: labels.count(c) for c in set(labels)}
    picks = stratified_sample(labels, 20, seed=0)
    assert len(picks) == 20 == len(set(picks.tolist()))
    for cls, total in counts.items():
        got = sum(labels[i] == cls for i in picks)
        assert abs(got - 20 * total / len(labels)) <= 1, (cls, got)
    assert np.array_equal(picks, stratified_sample(labels, 20, seed=0))
    assert not np.array_equal(picks, stratified_sample(labels, 20, seed=1))


def test_stratified_sample_keeps_a_rare_class_and_takes_all_when_asked():
    labels = ["common"] * 98 + ["rare"] * 2
    picks = stratified_sample(labels, 10, seed=3)
    assert len(picks) == 10 and sum(labels[i] == "rare" for i in picks) == 1
    assert np.array_equal(stratified_sample(labels, None, seed=3), np.arange(100))
    assert np.array_equal(stratified_sample(labels, 500, seed=3), np.arange(100))
    one_class = stratified_sample(["x"] * 50, 7, seed=0)
    assert len(set(one_class.tolist())) == 7 and one_class.max() < 50
