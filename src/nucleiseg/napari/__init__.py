"""nucleiseg in napari: a dock widget that segments, and fine-tunes on corrected nuclei; sample data; a reader and writers.

The plugin is declared in ``napari.yaml`` (npe2), found through the ``napari.manifest`` entry point:

- widget *Segment nuclei* (:mod:`._widget`): runs :func:`nucleiseg.segment` in a thread worker
  and adds a Labels layer with the per-nucleus table as its ``features``; *Fine-tune* trains the
  current model on corrected Labels layers (:mod:`._finetune`);
- sample data: the three example images, fluorescence, stained tissue and brightfield (:mod:`._sample`);
- writers: a Labels layer to an ImageJ ROI zip or a QuPath GeoJSON file; a reader for the outputs of
  ``nucleiseg predict`` (``<name>_labels.tif`` with ``<name>_nuclei.csv`` as features) (:mod:`._io`).

Nothing here imports PyTorch until a segmentation or fine-tuning runs.
"""
