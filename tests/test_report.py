"""``tvmquant report`` on the bundled Fashion-MNIST model: every section and figure is in the page, the ranges it
draws are the calibration's own, bad input gets one line; ``-m browser`` also renders it in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason='the report needs matplotlib: pip install "tvmquant[report]"')

import tvmquant  # noqa: E402
from tvmquant import cli  # noqa: E402
from tvmquant.examples import fmnist_model_path, load_fmnist_example  # noqa: E402
from tvmquant.qparams import Role  # noqa: E402
from tvmquant.report import ReportError, model_fingerprint  # noqa: E402

CALIB_SAMPLES = 32


class _Page(HTMLParser):
    """Sections, figures (kind and attributes), image sources, table rows and links of a report page."""

    def __init__(self):
        super().__init__()
        self.sections, self.figures, self.images, self.links = [], [], [], []
        self.rows = {}
        self._table = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "figure":
            self.figures.append(attrs)
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag in ("a", "link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(attrs.get("href") or attrs.get("src"))
        elif tag == "table":
            self._table = attrs.get("id", f"table{len(self.rows)}")
            self.rows[self._table] = 0
        elif tag == "tr" and self._table is not None:
            self.rows[self._table] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None


def _parse(path) -> _Page:
    page = _Page()
    with open(path, encoding="utf-8") as handle:
        page.feed(handle.read())
    return page


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The bundled model quantized on 32 images, its artifact with a finetune loss curve, and the data file."""
    folder = tmp_path_factory.mktemp("report")
    calib, _, _ = load_fmnist_example()
    calib = calib[:CALIB_SAMPLES]
    qmodel = tvmquant.quantize(fmnist_model_path(), calib_data=calib, progress=False, report_batches=2)
    artifact = folder / "fmnist.tvmq"
    qmodel.save(artifact)
    # tvmquant.finetune records its loss per step in the manifest ("finetune": {"loss_history": ...}; its own test
    # checks that): the report draws it when it is there.
    with_loss = folder / "fmnist_finetuned.tvmq"
    with zipfile.ZipFile(artifact) as source, zipfile.ZipFile(with_loss, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "manifest.json":
                manifest = json.loads(data)
                manifest["finetune"] = {"loss_history": [1.0 / (1 + step) for step in range(20)]}
                data = json.dumps(manifest).encode()
            target.writestr(info, data)
    np.savez(folder / "calib.npz", input=calib)
    return qmodel, calib, folder


def _bench(qmodel, **model):
    """A ``tvmquant bench`` result for ``qmodel``, in the format benchmark() writes (latencies made up)."""
    return {
        "model": {**model_fingerprint(qmodel), **model},
        "machine": {"cpu": "test CPU", "llvm_mcpu": "znver3", "cores": 2, "avx512_vnni": False, "amx_int8": False},
        "threads": [1, 2],
        "tuned": {"tvmquant_int8": False, "tvm_fp32": False},
        "latency_ms": {
            "tvmquant_int8": {"1": 0.5, "2": 0.3},
            "tvm_fp32": {"1": 1.0, "2": 0.6},
            "ort_fp32": {"1": 0.8, "2": 0.5},
        },
        "speedup": {"vs_tvm_fp32": {"1": 2.0, "2": 2.0}, "vs_ort_fp32": {"1": 1.6, "2": 1.67}},
        "skipped": {"ort_int8_qdq": "test"},
    }


@pytest.fixture(scope="module")
def report_page(quantized):
    """The report of the finetuned artifact with a bench JSON, written by ``tvmquant report``, and its data."""
    qmodel, _, folder = quantized
    loaded = tvmquant.load(folder / "fmnist_finetuned.tvmq")
    bench_path = folder / "bench.json"
    bench_path.write_text(json.dumps(_bench(loaded)))
    out = folder / "report.html"
    argv = ["report", str(folder / "fmnist_finetuned.tvmq"), "--data", str(folder / "calib.npz")]
    assert cli.main([*argv, "--bench", str(bench_path), "-o", str(out), "-q"]) == 0
    text = out.read_text(encoding="utf-8")
    data = json.loads(text.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0])
    return loaded, out, data


def test_report_has_every_section_and_figure(report_page):
    loaded, out, result = report_page
    assert result["sections"] == ["layers", "histograms", "weights", "sensitivity", "bench", "finetune"]
    page = _parse(out)
    assert page.sections == result["sections"]
    activations = sorted(name for name, params in loaded.table.items() if params.role == Role.ACTIVATION)
    weighted = sorted(layer.name for layer in loaded.layers if layer.weight)
    assert len(activations) >= 10 and len(weighted) >= 5  # the bundled model: 14 layers, 9 with weights
    kinds = [figure["data-kind"] for figure in page.figures]
    assert sorted(f["data-tensor"] for f in page.figures if f["data-kind"] == "histogram") == activations
    assert sorted(f["data-layer"] for f in page.figures if f["data-kind"] == "weights") == weighted
    assert kinds.count("sensitivity") == kinds.count("bench") == kinds.count("loss") == 1
    assert result["figures"] == {
        "histogram": len(activations),
        "weights": len(weighted),
        "sensitivity": 1,
        "bench": 1,
        "loss": 1,
    }
    # One row per layer (plus the header); the figures are real PNGs inside the page; nothing is fetched.
    assert page.rows["layer-table"] == len(loaded.layers) + 1
    assert len(page.images) == len(page.figures)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(link.startswith("#") for link in page.links), page.links
    text = out.read_text()
    assert "http://" not in text and "https://" not in text
    assert "tvmquant_int8" in text and "vs_tvm_fp32" in text
    # Sensitivity: every quantized layer with tensors of its own, a finite SQNR for each.
    assert set(result["sensitivity_db"]) <= {layer.name for layer in loaded.layers if layer.quantized}
    assert len(result["sensitivity_db"]) >= 10
    assert all(np.isfinite(float(value)) for value in result["sensitivity_db"].values())


def test_report_ranges_are_the_calibration_ones(report_page):
    """On the data it was quantized with, the report's percentile range (the configured method) is the range the
    model uses, for every activation: the histograms are the calibration's; max is the observed extremes."""
    loaded, _, result = report_page
    assert set(result["ranges"]) == {n for n, p in loaded.table.items() if p.role == Role.ACTIVATION}
    op_types = {layer.name: layer.op_type for layer in loaded.layers}
    for name, ranges in result["ranges"].items():
        params = loaded.table[name]
        # the method configured for this tensor's op (the default preset calibrates matmul inputs to their max)
        spec = loaded.config.activation_spec(op_types.get(name.rpartition(".")[0]))
        method = {"Max": "max", "Percentile": "percentile"}[type(spec.method).__name__]
        np.testing.assert_allclose(ranges[method], (float(params.a_min), float(params.a_max)), rtol=1e-6)
        low, high = ranges["max"]
        assert low <= ranges["percentile"][0] and ranges["percentile"][1] <= high
        for method in ("entropy", "mse"):
            assert low <= ranges[method][0] <= ranges[method][1] <= high


def test_report_bad_input_gets_one_line(quantized, tmp_path, capsys):
    qmodel, _, folder = quantized
    artifact, data = str(folder / "fmnist.tvmq"), str(folder / "calib.npz")

    def error(argv) -> str:
        assert cli.main(argv) == cli.EXIT_USER_ERROR
        message = capsys.readouterr().err.strip()
        assert message.count("\n") == 0 and "Traceback" not in message, message
        return message

    # No calibration statistics in the artifact and no --data: say what to pass.
    missing = tmp_path / "no_data.html"
    message = error(["report", artifact, "-o", str(missing)])
    assert "--data" in message and "fmnist.tvmq" in message and not missing.exists()
    # A bench JSON of another model: refused, naming both.
    other = tmp_path / "other_bench.json"
    other.write_text(json.dumps(_bench(qmodel, name="resnet50.tvmq", quant_table_sha256="0" * 64)))
    message = error(["report", artifact, "--data", data, "--bench", str(other), "-o", str(missing)])
    assert "resnet50.tvmq" in message and "fmnist.tvmq" in message and not missing.exists()
    not_bench = tmp_path / "not_bench.json"
    not_bench.write_text("{}")
    assert "not a `tvmquant bench` result" in error(["report", artifact, "--bench", str(not_bench), "-o", str(missing)])
    # An output folder that does not exist.
    message = error(["report", artifact, "--data", data, "-o", str(tmp_path / "nowhere" / "r.html")])
    assert "nowhere" in message and "does not exist" in message


def test_report_without_matplotlib_says_how_to_install(quantized, tmp_path, monkeypatch):
    qmodel, calib, _ = quantized
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(ImportError, match=r"tvmquant\[report\]"):
        qmodel.report(tmp_path / "r.html", data=calib, progress=False)
    assert not (tmp_path / "r.html").exists()


def test_report_refuses_missing_data_in_python(quantized, tmp_path):
    qmodel, _, _ = quantized
    with pytest.raises(ReportError, match="data="):
        qmodel.report(tmp_path / "r.html")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report_page, tmp_path):
    """Render the page as a person would see it (Debian's chromium) and check the screenshot is not blank.

    ``TVMQUANT_KEEP_SCREENSHOT=shot.png python -m pytest -m browser tests/test_report.py`` keeps the screenshot.
    """
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed: apt-get install -y chromium")
    _, page, _ = report_page
    shot = tmp_path / "report.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,3000"]
    subprocess.run([*command, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    if os.environ.get("TVMQUANT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["TVMQUANT_KEEP_SCREENSHOT"])
    image = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert image.shape[:2] == (3000, 1400)
    not_white = np.any(image < 240, axis=2)
    assert not_white.mean() > 0.05, f"only {not_white.mean():.1%} of the screenshot is not white"
    # Text, tables and the figures' colours: many distinct colours, in the top and the bottom half alike.
    colours = len(np.unique(image.reshape(-1, 3) // 8, axis=0))
    assert colours > 200, colours
    assert not_white[:1500].mean() > 0.02 and not_white[1500:].mean() > 0.02

    # The layer table sorts on a click: click "input SQNR dB" in the page, read the DOM Chromium ends with.
    clicked = tmp_path / "clicked.html"
    header = "input SQNR dB"
    click = (
        "<script>Array.prototype.find.call(document.querySelectorAll('#layer-table th'),"
        f" function (th) {{ return th.textContent === '{header}'; }}).click();</script></body>"
    )
    clicked.write_text(page.read_text(encoding="utf-8").replace("</body>", click), encoding="utf-8")
    dom = subprocess.run(
        [*command, "--dump-dom", clicked.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    column = _header_names(dom).index(header)
    values = _column(dom, column)
    numbers = [v for v in values if v == v]
    assert len(numbers) >= 10 and numbers == sorted(numbers), values
    in_page = [v for v in _column(page.read_text(encoding="utf-8"), column) if v == v]
    assert sorted(in_page) == numbers and in_page != numbers  # the click changed the order, and only the order


def _layer_table(html: str) -> str:
    return html.split('id="layer-table"', 1)[1].split("</table>", 1)[0]


def _header_names(html: str) -> list:
    return re.findall(r"<th\b[^>]*>(.*?)</th>", _layer_table(html))


def _column(html: str, column: int) -> list:
    body = _layer_table(html).split("<tbody>", 1)[1]
    rows = [re.findall(r"<td\b[^>]*>(.*?)</td>", row) for row in body.split("</tr>") if "<td" in row]
    return [float("nan") if row[column] == "-" else float(row[column]) for row in rows]


def test_sensitivity_section_shows_autoskip_order():
    """AutoSkip's choices (recorded in the layers' reasons) are listed in the order it chose them, on the chart."""
    import types

    from tvmquant.config import AutoSkip, QuantConfig
    from tvmquant.op_table import LayerInfo
    from tvmquant.report import _require_matplotlib, _sensitivity_section

    layers = [
        LayerInfo("conv2d_0", "conv2d", False, "auto: most sensitive (alone: 18.5 dB output SQNR)"),
        LayerInfo("conv2d_1", "conv2d"),
        LayerInfo("matmul_0", "matmul", False, "auto: most sensitive (alone: 12.0 dB output SQNR)"),
    ]
    qmodel = types.SimpleNamespace(sqnr={"output0": 25.0}, config=QuantConfig(auto_skip=AutoSkip(30.0)))
    figures: dict = {}
    html = _sensitivity_section(_require_matplotlib(), {"conv2d_1": 40.0}, layers, qmodel, figures)
    assert figures == {"sensitivity": 1}
    order = html.split("<ol>", 1)[1].split("</ol>", 1)[0]
    assert order.index("matmul_0") < order.index("conv2d_0")  # most sensitive first, as AutoSkip chose
    assert "12.0 dB" in order and "18.5 dB" in order
