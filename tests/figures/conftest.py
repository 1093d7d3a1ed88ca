"""Headless chromium for the report tests (skipped, saying why, when chromium is missing)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=10000",
)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def render_dom(tmp_path_factory):
    """``render_dom(path) -> (dom, attrs)``: the DOM after load and the <body> attributes."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); browser test skipped")

    def render(path):
        profile = tmp_path_factory.mktemp("chromium-profile")
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", path.as_uri()]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        body = re.search(r"<body([^>]*)>", r.stdout)
        assert body, r.stdout[:500]
        return r.stdout, dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))

    return render
