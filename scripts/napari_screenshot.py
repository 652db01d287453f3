"""The README's napari screenshot, taken from a real viewer: the tissue sample segmented by the dock widget.

    xvfb-run -a -s "-screen 0 1400x900x24" .venv/bin/python scripts/napari_screenshot.py docs/images/napari.png

(Under a virtual X server, as the tests run; on a desktop, without xvfb-run.) The window is captured with
its dock widget, then reduced to a 64-colour palette to keep the PNG small.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: str = "docs/images/napari.png") -> None:
    import napari
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from npe2 import PluginManager, PluginManifest

    manager = PluginManager.instance()
    try:
        manager.get_manifest("nucleiseg")
    except KeyError:  # a checkout not (re)installed since the plugin's entry point was added
        manager.register(PluginManifest.from_file(Path(__file__).resolve().parents[1] / "src/nucleiseg/napari/napari.yaml"))
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"  # no toasts over the picture
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 760)
    viewer.open_sample("nucleiseg", "tissue")
    _, widget = viewer.window.add_plugin_dock_widget("nucleiseg", "Segment nuclei")
    widget.segment()
    while widget.running:
        QApplication.processEvents()
    nuclei = viewer.layers["tissue nuclei"]
    viewer.layers.selection.active = nuclei
    viewer.reset_view()
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):  # shown before the setting applied
        toast.hide()
    app.processEvents()
    image = viewer.screenshot(canvas_only=False, flash=False)
    picture = Image.fromarray(image[..., :3]).quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, optimize=True)
    print(f"wrote {out}: {image.shape[1]}x{image.shape[0]}, {Path(out).stat().st_size // 1024} KiB, "
          f"{nuclei.data.max()} nuclei")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
