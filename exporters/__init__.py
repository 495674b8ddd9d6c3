"""Train, export, quantize and verify models for edge-infer (the ``train`` extra).

The pipeline is ``recipe -> train -> export -> quantize -> verify``; each step is a
subcommand of ``edge-infer`` (see :mod:`exporters.cli`) and a function here:

* :func:`exporters.train.train` fits a template from :mod:`exporters.templates`
  on a data set loaded by :mod:`exporters.data` and writes a checkpoint;
* :func:`exporters.export.export` writes a self-contained ONNX file that takes raw
  sensor units and returns probabilities or values, with the manifest
  (:mod:`edge.manifest`) in its metadata;
* :func:`exporters.quantize.quantize` writes the int8 model, with settings that are
  exact on x86 (with or without VNNI) and on ARM;
* :func:`exporters.verify.verify` measures parity, accuracy, latency and feature
  importance and writes the model card and JSON report.
"""

from __future__ import annotations
