"""Nuclei with holes or in several pieces keep them in GeoJSON (interior rings, MultiPolygon) and ImageJ ROIs
(composite ROIs), checked with independent readers: shapely, roifile, and an even-odd rasterisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage.draw import disk, polygon as fill_polygon

from nucleiseg.io import nucleus_outlines, nucleus_polygons, write_geojson, write_imagej_rois

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape  # noqa: E402


def _labels() -> np.ndarray:
    """1: a square; 2: a disc with two holes; 3: two pieces, one with a hole; 4: touches only diagonally (two pieces
    to find_contours); 5: a ring with an island of the same label inside its hole."""
    labels = np.zeros((80, 100), np.int32)
    labels[2:10, 2:10] = 1
    rr, cc = disk((30, 25), 14, shape=labels.shape)
    labels[rr, cc] = 2
    labels[24:28, 20:24] = 0
    labels[33:35, 28:31] = 0
    labels[5:20, 50:65] = 3
    labels[10:14, 55:59] = 0
    labels[5:9, 70:74] = 3
    labels[50, 50] = labels[51, 51] = 4
    labels[55:75, 70:90] = 5
    labels[58:72, 73:87] = 0
    labels[63:67, 78:82] = 5
    return labels


def _even_odd(rings: list[np.ndarray], shape_: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside an odd number of rings: how ImageJ fills a composite ROI."""
    inside = np.zeros(shape_, bool)
    for ring in rings:
        rr, cc = fill_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape_)  # centre of pixel (r, c) is (c+.5, r+.5)
        part = np.zeros(shape_, bool)
        part[rr, cc] = True
        inside ^= part
    return inside


def test_polygons_cover_exactly_each_nucleus():
    labels = _labels()
    found = dict(nucleus_polygons(labels))
    assert sorted(found) == [1, 2, 3, 4, 5]
    assert [len(rings) for rings in found[1]] == [1]
    assert [len(rings) for rings in found[2]] == [3]  # exterior + 2 holes
    assert [len(rings) for rings in found[3]] == [2, 1]  # the larger piece (with its hole) first
    assert [len(rings) for rings in found[4]] == [1, 1]
    assert [len(rings) for rings in found[5]] == [2, 1]
    for label, polygons in found.items():
        rings = [ring for rings in polygons for ring in rings]
        assert all(np.array_equal(r[0], r[-1]) for r in rings)
        np.testing.assert_array_equal(_even_odd(rings, labels.shape), labels == label, err_msg=str(label))
    # nucleus_outlines keeps giving the outer ring of the largest piece
    for label, outline in nucleus_outlines(labels):
        np.testing.assert_array_equal(outline, found[label][0][0])


def test_geojson_has_interior_rings_and_multipolygons(tmp_path):
    labels = _labels()
    write_geojson(tmp_path / "n.geojson", labels)
    features = json.loads((tmp_path / "n.geojson").read_text())["features"]
    geometries = {f["properties"]["label"]: f["geometry"] for f in features}
    assert {k: g["type"] for k, g in geometries.items()} == {
        1: "Polygon", 2: "Polygon", 3: "MultiPolygon", 4: "MultiPolygon", 5: "MultiPolygon"}
    for label, geometry in geometries.items():
        geom = shape(geometry)
        assert geom.is_valid, (label, shapely.validation.explain_validity(geom))
        # the polygons' area is about the pixels' (marching squares cuts corners, of holes too) ...
        pixels = int((labels == label).sum())
        assert 0.5 * pixels <= geom.area <= 1.05 * pixels, label  # a lone pixel is a diamond of 0.5
        # ... and every pixel centre is inside exactly when the pixel belongs to the nucleus
        rows, cols = np.mgrid[: labels.shape[0], : labels.shape[1]]
        box = geom.bounds
        near = (cols + 0.5 >= box[0] - 1) & (cols + 0.5 <= box[2] + 1) & (rows + 0.5 >= box[1] - 1) & (rows + 0.5 <= box[3] + 1)
        points = shapely.points(cols[near] + 0.5, rows[near] + 0.5)
        np.testing.assert_array_equal(shapely.contains(geom, points), labels[near] == label, err_msg=str(label))
    assert len(shape(geometries[2]).interiors) == 2
    assert len(shape(geometries[3]).geoms) == 2 and len(shape(geometries[3]).geoms[0].interiors) == 1
    # holes wound against their exterior (the GeoJSON right-hand rule's relation)
    ring_areas = [shapely.Polygon(r).area for r in geometries[2]["coordinates"]]
    assert ring_areas[0] > 0 and all(a > 0 for a in ring_areas)
    signed = [shapely.LinearRing(r).is_ccw for r in geometries[2]["coordinates"]]
    assert signed[1] == signed[2] != signed[0]


def test_imagej_composite_rois_read_back(tmp_path):
    import roifile

    labels = _labels()
    write_imagej_rois(tmp_path / "rois.zip", labels)
    rois = {int(r.name): r for r in roifile.roiread(tmp_path / "rois.zip")}
    assert sorted(rois) == [1, 2, 3, 4, 5]
    assert rois[1].roitype == roifile.ROI_TYPE.POLYGON and not rois[1].composite
    for label in (2, 3, 4, 5):
        roi = rois[label]
        assert roi.roitype == roifile.ROI_TYPE.RECT and roi.composite, label
        rings = roi.coordinates(multi=True)
        expected = [ring for rings_ in dict(nucleus_polygons(labels))[label] for ring in rings_]
        assert len(rings) == len(expected)
        for got, want in zip(rings, expected):
            np.testing.assert_allclose(got, want, atol=1e-4)
        np.testing.assert_array_equal(_even_odd(rings, labels.shape), labels == label, err_msg=str(label))
        # the header's bounds hold the whole shape (ImageJ reads them as the ROI's bounds)
        every = np.concatenate(rings)
        assert roi.left <= every[:, 0].min() and roi.right >= every[:, 0].max()
        assert roi.top <= every[:, 1].min() and roi.bottom >= every[:, 1].max()


def test_sparse_label_values_cost_no_memory_per_value(tmp_path):
    """Global ids (a Dask run's ``1 + row * width + col``) give the same polygons as the labels numbered 1..n,
    without find_objects' list of one entry per value up to the largest (2**40 here: terabytes)."""
    import tracemalloc

    labels = _labels().astype(np.int64)
    sparse = np.where(labels > 0, labels * 2**38, 0)
    tracemalloc.start()
    found = dict(nucleus_polygons(sparse))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2**20
    assert sorted(found) == [k * 2**38 for k in range(1, 6)]
    dense = dict(nucleus_polygons(labels))
    for k in range(1, 6):
        assert all(np.array_equal(a, b) for p, q in zip(found[k * 2**38], dense[k]) for a, b in zip(p, q))
    write_geojson(tmp_path / "n.geojson", sparse)
    labels_out = [f["properties"]["label"] for f in json.loads((tmp_path / "n.geojson").read_text())["features"]]
    assert labels_out == [k * 2**38 for k in range(1, 6)]
