#!/usr/bin/env bash
# One command installs everything nucleiseg needs into ./.venv:
#   bash scripts/setup.sh
# torch is pinned to the 2.13.0 CPU build first so that no resolver ever pulls a
# multi-GB CUDA build; the package then installs editable with its test, napari and bioimageio extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

# System libraries for the napari plugin's headless tests: a virtual X server (Qt's "offscreen" platform
# gives napari no OpenGL context; xauth for xvfb-run), Mesa's software OpenGL, and what Qt's xcb platform plugin links to
# (ldd of PyQt5's libqxcb.so and libQt5XcbQpa.so; libxcb-cursor0 for Qt >= 6.5; libdbus-1-3 is dlopen'ed).
# Installed with apt-get, as root (or through passwordless sudo), and only those missing.
SYSTEM_PACKAGES="xvfb xauth libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri libglib2.0-0 libfontconfig1 libfreetype6
    libdbus-1-3 libx11-xcb1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0
    libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-xkb1 libxcb-glx0 libxcb-sync1
    libxcb-shm0 libxcb-cursor0"
if command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
    missing=""
    for pkg in $SYSTEM_PACKAGES; do
        # Ubuntu 24.04 renamed some (libglib2.0-0t64): a package providing the name counts as installed
        if ! dpkg-query -W -f='${Status}\n' "$pkg" "${pkg}t64" 2>/dev/null | grep -q "install ok installed"; then
            missing="$missing $pkg"
        fi
    done
    if [ -n "$missing" ]; then
        if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
        if [ "$SUDO" = "none" ]; then
            echo "setup.sh: not root: install these for the napari tests: apt-get install$missing" >&2
        else
            echo "setup.sh: installing system packages:$missing"
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            # shellcheck disable=SC2086
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
        fi
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test,napari,bioimageio,cluster]"
.venv/bin/python -c "import nucleiseg, torch; print('nucleiseg', nucleiseg.__version__, 'with torch', torch.__version__, 'installed in .venv')"
