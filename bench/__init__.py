"""edge-infer benchmark suite: the daemon beside its baselines, against a real Mosquitto, in one run.

``python -m bench`` (``make bench``, ``edge-infer bench``) runs the comparison; ``python -m bench soak``
the memory soak. See docs/performance.md for what is measured and how to read the results.
"""
