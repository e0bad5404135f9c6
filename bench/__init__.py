"""veil benchmark harness.

Measures the mock upstream, a bare Starlette pass-through proxy and veil itself under the
same load, in one run, and reports everything as ratios against those baselines.
Run ``python -m bench --help`` for usage.
"""
