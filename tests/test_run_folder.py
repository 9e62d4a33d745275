"""The run folder and the trained model: one owner each, runs of the first version still load,
and the configuration is checked before anything heavy is imported or read."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from medxfer.classification.trained import TrainedModel
from medxfer.config import RunConfig
from medxfer.errors import MedxferError
from medxfer.models.factory import create_model
from medxfer.models.spec import ModelSpec
from medxfer.storage.folder import RunFolder


def test_config_module_imports_no_torch():
    code = "import sys, medxfer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"folds": 5, "fold": 0, "val_fraction": 0.2}, "--folds replaces --val-fraction"),
        ({"folds": 5, "fold": 7}, "--fold must be in 0..4"),
        ({"folds": 5}, "--folds K and --fold f go together"),
        ({"task": "multiclass", "threshold": "youden"}, "threshold rules apply to binary"),
        ({"task": "multilabel", "positive": "A"}, "has no positive class"),
        ({"threshold": "sens=2"}, "--threshold"),
        ({"color": "purple"}, "--color"),
        ({"max_pixels": 0}, "--max-pixels"),
    ],
)
def test_options_are_refused_when_the_config_is_built(options, message):
    with pytest.raises(MedxferError, match=message):
        RunConfig(data="nowhere", out="nowhere", **options)


def _first_version_model_file(path, tmp_cfg: dict) -> TrainedModel:
    """A model.pt as medxfer 0.1 wrote it (binary only, head weights under ``head.*``)."""
    network = create_model(ModelSpec("mobilenet_v2", "transfer"), load_weights=False).eval()
    state = {
        (k.replace("head.linear.", "head.") if k.startswith("head.") else k): v
        for k, v in network.state_dict().items()
    }
    torch.save(
        {
            "config": tmp_cfg,
            "state_dict": state,
            "threshold": 0.3,
            "temperature": 1.5,
            "positive": "PNEUMONIA",
            "negative": "NORMAL",
            "classes": ["NORMAL", "PNEUMONIA"],
        },
        path,
    )
    return network


def test_a_first_version_model_loads_with_its_numbers(tmp_path):
    old_config = {
        "data": "d",
        "out": "o",
        "arch": "mobilenet_v2",
        "mode": "transfer",
        "image_size": 32,
        "threshold": "0.5",
        "val_fraction": 0.1,
    }
    network = _first_version_model_file(tmp_path / "model.pt", old_config)
    model = TrainedModel.load(tmp_path / "model.pt")
    assert model.task.name == "binary" and model.classes == ("NORMAL", "PNEUMONIA")
    assert model.thresholds == [0.3] and model.temperature == 1.5 and model.color == "gray"
    pixels = torch.randint(0, 256, (4, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = network(pixels.unsqueeze(1).float() / 255).double().numpy()
    expected = 1 / (1 + np.exp(-logits / 1.5))
    np.testing.assert_allclose(model.probabilities(pixels), expected, atol=1e-6)


def test_an_unreadable_model_file_is_one_clear_line(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(MedxferError, match="unreadable model file"):
        TrainedModel.load(tmp_path)
    with pytest.raises(MedxferError, match="no trained model"):
        TrainedModel.load(tmp_path / "elsewhere")


def test_first_version_predictions_read_as_test_rows(tmp_path):
    pd.DataFrame({"file": ["a"], "label": ["NORMAL"], "probability": [0.2]}).to_csv(
        tmp_path / RunFolder.PREDICTIONS, index=False
    )
    rows = RunFolder(tmp_path).read_predictions("test")
    assert list(rows.split) == ["test"] and rows.probability.tolist() == [0.2]
    assert RunFolder(tmp_path).read_predictions("val").empty


def test_outputs_get_the_mode_of_a_plainly_created_file(tmp_path):
    """Atomic writes go through mkstemp (mode 0o600); the result must be what open() gives."""
    import os

    from medxfer.atomic import write_text

    (tmp_path / "plain.txt").write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    plain, atomic = (os.stat(tmp_path / n).st_mode & 0o777 for n in ("plain.txt", "atomic.txt"))
    assert atomic == plain


@pytest.mark.parametrize("text", ["[]", "{}", '{"run": 3}', "\xff\xfe"])
def test_a_config_json_of_the_wrong_shape_is_one_line(tmp_path, text):
    folder = RunFolder(tmp_path)
    folder.file(RunFolder.CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(MedxferError, match=r"config\.json: (not a medxfer run|unreadable)"):
        folder.read_options()


def test_an_unknown_task_family_is_one_line(tmp_path):
    from medxfer.families import family

    with pytest.raises(MedxferError, match="task family 'nosuch': not one of classification"):
        family("nosuch")
