"""Plots: every kind is written as PNG and PDF; the HTML renders a surface in headless chromium."""

import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest
import torch

import landscape as L


def _bowl(scale=1.0, n=15, label="bowl") -> L.Surface:
    xs = np.linspace(-1, 1, n)
    ys = np.linspace(-1, 1, n + 2)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    loss = scale * (0.1 + X**2 + 3 * Y**2)
    return L.Surface([xs, ys], loss, 1 - loss / loss.max(), None, {"label": label})


def _ok(paths):
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000, p
    return paths


@pytest.mark.parametrize("kind", ["contour", "filled", "heatmap", "3d"])
def test_plot_2d_kinds_png_and_pdf(tmp_path, kind):
    fig = L.plot_2d(_bowl(), kind=kind, path=tmp_path / kind)
    _ok([tmp_path / f"{kind}.png", tmp_path / f"{kind}.pdf"])
    if kind == "contour":
        assert fig.axes[0].texts, "contour levels are labelled"


def test_side_by_side_panels_share_scale_and_axes(tmp_path):
    fig = L.plot_2d([_bowl(1, label="SGD"), _bowl(5, label="SAF")], kind="filled", log=True,
                    path=tmp_path / "p")  # fmt: skip
    _ok([tmp_path / "p.png", tmp_path / "p.pdf"])
    a, b = fig.axes[0], fig.axes[1]
    assert a.get_shared_x_axes().joined(a, b) and a.get_shared_y_axes().joined(a, b)
    levels = [c.levels for ax in (a, b) for c in ax.collections if hasattr(c, "levels")]
    assert len(levels) >= 2 and all(np.array_equal(levels[0], lv) for lv in levels)
    # the shared scale spans both surfaces (log10 of min of 1st and max of 2nd)
    assert levels[0][0] == pytest.approx(np.log10(0.1)) and levels[0][-1] == pytest.approx(
        np.log10(5 * 4.1)
    )


def test_plot_1d_log_and_accuracy(tmp_path):
    xs = np.linspace(-1, 1, 11)
    s = L.Surface([xs], np.exp(xs), np.full(11, 0.5))
    fig = L.plot_1d([s, s], labels=["a", "b"], path=tmp_path / "line", log=True, accuracy=True)
    _ok([tmp_path / "line.png", tmp_path / "line.pdf"])
    assert fig.axes[0].get_yscale() == "log"


def test_plot_trajectory(tmp_path):
    g = torch.Generator().manual_seed(0)
    traj = [{"w": torch.randn(10, dtype=torch.float64, generator=g)} for _ in range(5)]
    pca = L.pca_directions(traj, keys=["w"])
    L.plot_trajectory(pca, _bowl(), path=tmp_path / "traj", labels=range(5))
    _ok([tmp_path / "traj.png", tmp_path / "traj.pdf"])


def test_html_is_standalone(tmp_path):
    p = L.write_html([_bowl(label="SGD"), _bowl(3, label="SAF")], tmp_path / "s.html")
    html = p.read_text()
    assert "<script src=" not in html  # nothing is fetched: the page works offline
    assert "plotly.js v" in html.lower()  # the library itself is inlined (its banner)
    assert "SGD" in html and "SAF" in html  # both surfaces are on the page


@pytest.mark.browser
def test_html_screenshot_in_headless_chromium_shows_surface(tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); browser test skipped")
    page = L.write_html(_bowl(label="bowl"), tmp_path / "s.html")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--enable-unsafe-swiftshader", "--virtual-time-budget=15000",
             f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
             "--window-size=1100,520"]  # fmt: skip
    r = subprocess.run([exe, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = matplotlib.image.imread(shot)[..., :3]
    assert img.shape[:2] == (520, 1100)
    # Not blank: both panels are colour maps. Saturated (viridis) pixels cover a good part
    # of the 3D panel (left) and most of the contour panel (right); a blank or error page
    # has none.
    sat = img.max(-1) - img.min(-1) > 0.25
    left, right = sat[80:480, 100:500].mean(), sat[100:400, 600:1000].mean()
    assert left > 0.05 and right > 0.7, (left, right)
    colours = np.unique((img[100:400, 600:1000] * 255).round().astype(int).reshape(-1, 3), axis=0)
    assert len(colours) > 50, len(colours)
