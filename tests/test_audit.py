import json
import shutil

from medxfer.cli import main
from medxfer.data.audit import audit
from tests.conftest import make_subset


def test_audit_finds_duplicates_leaks_and_unreadable(tmp_path, capsys):
    data = make_subset(tmp_path / "d", {"train": 5, "test": 3})
    train_file = sorted((data / "train" / "PNEUMONIA").iterdir())[0]
    shutil.copy(train_file, data / "test" / "PNEUMONIA" / train_file.name)  # leak + duplicate
    bad = data / "train" / "NORMAL" / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    report = audit(str(data))
    assert report["counts"]["train"] == {"NORMAL": 6, "PNEUMONIA": 5}
    assert report["sizes"] == {"224x224": 17}
    assert [u["file"] for u in report["unreadable"]] == [str(bad)]
    assert report["duplicates"]["across_splits"] == 1
    patient = train_file.name.split("_")[0]
    assert patient in report["patients_shared_between_splits"]["train/test"]["examples"]
    assert main(["audit", str(data), "--json", str(tmp_path / "a.json")]) == 0
    assert "exact duplicates: 1 groups" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["total"] == 18
