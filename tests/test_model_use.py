"""Using a trained model from Python and from a browser: the README's API example run as it is
written (paths swapped for a small real subset), the model card, and ``medxfer serve`` in a
real headless Chromium."""

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medxfer
from medxfer.classification.card import NOTICE
from medxfer.storage.folder import RunFolder

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[1] / "README.md"
BROKEN = b"\xff\xd8\xff\xe0" + b"\x00" * 64  # a JPEG header and nothing else


def readme_example() -> str:
    """The Python block under the README's "Python API" heading."""
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def example(small_kermany, tmp_path_factory):
    """Run the README example on the small subset; its namespace and its run folder."""
    out = tmp_path_factory.mktemp("api") / "quick-look"
    code = readme_example()
    assert '"../shared/data/chest_xray"' in code and '"runs/quick-look' in code
    code = code.replace('"../shared/data/chest_xray"', repr(str(small_kermany)))
    code = code.replace('"runs/quick-look', f'"{out}')
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace, RunFolder(out)


def test_import_medxfer_loads_no_torch():
    code = "import medxfer, sys; medxfer.__all__; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert {"train", "load", "run_study"} <= set(medxfer.__all__)


def test_readme_example_trains_predicts_explains_exports(example, small_kermany):
    namespace, run = example
    assert isinstance(namespace["run"], RunFolder) and run.is_complete()
    scans = namespace["scans"]
    table = namespace["table"]
    assert len(scans) == 4 and list(table.file) == [str(p) for p in scans]
    # the API's predictions are those the run stored for the same test images, which came
    # from cached backbone features through the head: another path through the network
    stored = run.read_predictions("test")
    stored = stored.set_index(stored.file.map(lambda f: Path(f).name))
    names = [p.name for p in scans]
    np.testing.assert_allclose(table.probability, stored.probability[names], atol=1e-5)
    assert list(table.predicted) == list(stored.predicted[names])
    assert [p.name for p in namespace["cams"]] == [f"{p.stem}_cam.png" for p in scans]
    assert Image.open(namespace["cams"][0]).size == (64, 64)
    # arrays in memory give what their files give
    model = namespace["model"]
    pixels = [np.asarray(Image.open(p).convert("L")) for p in scans]
    from_arrays = model.predict(pixels)
    np.testing.assert_allclose(from_arrays.probability, table.probability, atol=1e-6)
    meta = json.loads(Path(f"{namespace['onnx']}.json").read_text())
    assert meta["notice"] == NOTICE and meta["model_card"]["arch"] == "mobilenet_v2"


def test_model_card_states_the_runs_facts(example, small_kermany):
    _, run = example
    card = run.read_model_card()
    metrics = run.read_metrics()
    assert NOTICE in card and "mobilenet_v2, transfer" in card
    # counts per class in the test split: the files in the subset's folders
    for cls in ("NORMAL", "PNEUMONIA"):
        assert len(list((small_kermany / "test" / cls).iterdir())) == 10
    assert "- test per class: NORMAL 10, PNEUMONIA 10" in card
    sizes = metrics["split_sizes"]
    assert f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']}" in card
    assert f"Threshold {metrics['thresholds'][0]:.4f} (rule youden" in card
    lo, hi = metrics["test"]["ci95"]["accuracy"]
    assert f"| accuracy | {metrics['test']['accuracy']:.4f} | {lo:.4f} – {hi:.4f} |" in card
    assert f"{metrics['calibration']['test_ece']:.4f}" in card


# -- medxfer serve ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(example):
    """The serve app of the README example's run, on a free local port."""
    uvicorn = pytest.importorskip("uvicorn")
    from medxfer.serve import create_app

    _, run = example
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        create_app(medxfer.load(run)), host="127.0.0.1", port=port, log_level="warning"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not instance.started and time.time() < deadline:
        time.sleep(0.1)
    assert instance.started
    yield f"http://127.0.0.1:{port}/"
    instance.should_exit = True
    thread.join(10)


def test_json_endpoint_answers_each_file(server, example, small_kermany, tmp_path):
    import requests

    namespace, _ = example
    scan = namespace["scans"][0]
    sixteen = tmp_path / "sixteen.png"  # the same X-ray as a 16-bit PNG
    gray = np.asarray(Image.open(scan).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray).save(sixteen)
    files = [
        ("files", (scan.name, scan.read_bytes(), "image/jpeg")),
        ("files", ("broken.jpeg", BROKEN, "image/jpeg")),
        ("files", (sixteen.name, sixteen.read_bytes(), "image/png")),
    ]
    reply = requests.post(server + "api/predict", files=files, timeout=120)
    assert reply.status_code == 200
    body = reply.json()
    ok, broken, wide = body["results"]
    assert body["notice"] == NOTICE
    expected = namespace["model"].predict([scan, sixteen])
    assert ok["probabilities"]["PNEUMONIA"] == pytest.approx(expected.probability[0], abs=1e-6)
    assert wide["probabilities"]["PNEUMONIA"] == pytest.approx(expected.probability[1], abs=1e-6)
    assert ok["predicted"] == expected.predicted[0]
    assert ok["cam"].startswith("data:image/png;base64,")
    assert broken["file"] == "broken.jpeg" and "unreadable image" in broken["error"]
    assert "medxfer-serve-" not in broken["error"]  # the reason names no temporary file
    too_many = [("files", (f"{i}.jpeg", BROKEN, "image/jpeg")) for i in range(17)]
    refused = requests.post(server + "api/predict", files=too_many, timeout=60)
    assert refused.status_code == 413 and "at most 16 files" in refused.json()["detail"]
    # a body larger than all files together may be is refused from its length, before upload
    from medxfer.serve import MAX_REQUEST

    head = {"Content-Length": str(MAX_REQUEST + 1), "Content-Type": "multipart/form-data"}
    huge = requests.post(server + "api/predict", data=b"", headers=head, timeout=30)
    assert huge.status_code == 413 and "request larger than" in huge.json()["detail"]
    about = requests.get(server + "api/model", timeout=30).json()
    assert about["notice"] == NOTICE and about["card"]["task"] == "binary"


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1200,1100")
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def test_page_in_a_real_browser(server, example, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    namespace, _ = example
    scan = namespace["scans"][0]
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(BROKEN)
    expected = namespace["model"].predict([scan])
    probability, threshold = float(expected.probability[0]), namespace["model"].thresholds[0]
    browser = _chromium()
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: "mobilenet_v2" in b.find_element(By.ID, "card").text)
        assert NOTICE in browser.find_element(By.TAG_NAME, "body").text
        browser.find_element(By.ID, "files").send_keys(f"{scan}\n{broken}")
        wait.until(lambda b: len(b.find_elements(By.CLASS_NAME, "result")) == 2)
        shown = browser.find_element(By.CLASS_NAME, "probability").text
        assert float(shown) == pytest.approx(probability, abs=5e-5)
        error = browser.find_element(By.CLASS_NAME, "error").text
        assert "medxfer-serve-" not in error and "unreadable image" in error
        assert len(browser.find_elements(By.CSS_SELECTOR, ".result img")) == 2  # X-ray + CAM
        decision = browser.find_element(By.CLASS_NAME, "decision").text
        assert decision == ("PNEUMONIA" if probability >= threshold else "NORMAL")
        # the slider moves the operating point: above the probability the decision flips
        slider = browser.find_element(By.CLASS_NAME, "threshold")
        for cut, label in ((0.0, "PNEUMONIA"), (1.0, "NORMAL")):
            browser.execute_script(
                "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('input'));",
                slider,
                cut,
            )
            assert browser.find_element(By.CLASS_NAME, "decision").text == label
    finally:
        browser.quit()
