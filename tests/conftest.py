"""Fixtures shared across the test suite: the committed DSB2018 sample, prepared once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DSB_FIXTURE = FIXTURES / "dsb"


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    """Tests use small models: one thread keeps them deterministic and leaves the other core free."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fixture_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The four-image DSB fixture as a prepared cache; the brightfield crop is its validation image.

    (Each kind has a single group in the fixture, so a stratified split keeps them all in
    training; the split file is edited by hand, as a user may do.)
    """
    import pandas as pd

    from nucleiseg.data.cache import prepare_dataset

    out = tmp_path_factory.mktemp("fixture-cache") / "dsb"
    prepare_dataset(DSB_FIXTURE, out, workers=1, progress=False)
    split = pd.read_csv(out / "split.csv")
    split["split"] = ["val" if i.endswith("_crop256") else "train" for i in split["image_id"]]
    split.to_csv(out / "split.csv", index=False)
    return out
