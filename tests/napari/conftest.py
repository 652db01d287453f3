"""The napari plugin's tests: a virtual X server for the session, the plugin registered with npe2.

Qt's ``offscreen`` platform gives napari no OpenGL context on a headless Linux machine, so on Linux
the session runs its own Xvfb (scripts/setup.sh installs it with Mesa and Qt's xcb libraries) and
points ``DISPLAY`` at it before pytest-qt creates the QApplication. Elsewhere Qt's native platform is used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

MANIFEST = Path(__file__).resolve().parents[2] / "src" / "nucleiseg" / "napari" / "napari.yaml"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent (pytest) exits (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _start_xvfb() -> tuple[subprocess.Popen, str]:
    """Xvfb on a free display (it picks one and writes its number to ``-displayfd``)."""
    read, write = os.pipe()
    # It must outlive the QApplication (Qt aborts the process when its X server goes away), which lives
    # until the interpreter exits: Xvfb ends itself when its last client disconnects (-terminate), or
    # with pytest (the parent-death signal) if no client ever came.
    process = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp", "-terminate"],
        pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent,
    )
    os.close(write)
    number = b""
    with os.fdopen(read, "rb") as pipe:
        while not number.endswith(b"\n"):
            chunk = pipe.read(1)
            if not chunk:
                break
            number += chunk
    if not number.strip():
        process.kill()
        pytest.fail("Xvfb did not start (run scripts/setup.sh as root to install xvfb and Mesa)")
    return process, f":{number.decode().strip()}"


@pytest.fixture(scope="session", autouse=True)
def _virtual_display():
    """A virtual X server for the whole session, on Linux; nothing elsewhere."""
    pytest.importorskip("napari")
    if not sys.platform.startswith("linux"):
        yield None
        return
    if shutil.which("Xvfb") is None:
        pytest.fail("napari is installed but Xvfb is not: run scripts/setup.sh as root (apt-get install xvfb)")
    saved = {key: os.environ.get(key) for key in ("DISPLAY", "QT_QPA_PLATFORM", "XDG_RUNTIME_DIR")}
    process, display = _start_xvfb()
    runtime = tempfile.mkdtemp(prefix="nucleiseg-xdg-")
    os.chmod(runtime, 0o700)
    os.environ.update(DISPLAY=display, QT_QPA_PLATFORM="xcb", XDG_RUNTIME_DIR=runtime)
    try:
        yield display
    finally:
        # Xvfb is left to end with the process (see _start_xvfb); its runtime folder goes now
        shutil.rmtree(runtime, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def _plugin_registered(_virtual_display):
    """The plugin's manifest known to npe2 even where the package was not (re)installed with its entry point."""
    from npe2 import PluginManager, PluginManifest

    manager = PluginManager.instance()
    try:
        manager.get_manifest("nucleiseg")
    except KeyError:
        manager.register(PluginManifest.from_file(MANIFEST))
    yield
