"""Collection rules for the whole repository (tests/ and the doctests of src/nucleiseg)."""

import importlib.util

# The napari plugin's modules import napari and Qt: without them (no `napari` extra) their
# doctests are not collected; tests/napari skips itself.
collect_ignore_glob = [] if importlib.util.find_spec("napari") else ["src/nucleiseg/napari/*"]
