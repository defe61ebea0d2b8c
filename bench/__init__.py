"""The streamrelay benchmark harness: streamrelay against peers, from outside.

``./bench/run --quick`` (about a minute) or ``./bench/run`` (the full set); see
docs/performance.md.  C load generators (``loadgen/``) and peers (``peers/``) live
beside this package; results go to ``results/``.
"""
