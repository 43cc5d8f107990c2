"""The HTML report: self-contained, three plots, renders in headless Chromium."""

import copy
import shutil
import subprocess

import pytest
import torch

import lowbit
from lowbit.eval.report import build_report, capture_layer_inputs, write_report
from lowbit.nn import disable_quantizers, enable_quantizers
from tests.tiny_models import build, calib_ids, loop_over


@pytest.fixture(scope="module")
def page():
    m = build("llama")
    fp = copy.deepcopy(m)
    loop = loop_over(calib_ids(6, 32))
    lowbit.quantize(m, "int8-smoothquant", forward_loop=loop)
    disable_quantizers(m)
    inp = capture_layer_inputs(m, loop)
    enable_quantizers(m)
    raw = capture_layer_inputs(fp, loop, names=list(inp))
    return build_report(m, inp, {"model": "tiny", "recipe": "int8-smoothquant"}, "t", raw)


def test_self_contained_with_plots(page, tmp_path):
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page
    assert "Per-layer error" in page and "Activation outliers" in page
    p = write_report(tmp_path / "r.html", page)
    assert p.read_text() == page


@pytest.mark.browser
def test_renders_in_headless_chromium(page, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian package 'chromium')")
    html = write_report(tmp_path / "r.html", page)
    shot = tmp_path / "r.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", html.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000  # a page with plots, not blank
    # the plots are in the screenshot: many distinct colours
    from PIL import Image

    img = Image.open(shot).convert("RGB").resize((300, 500))
    assert len(set(img.getdata())) > 50
