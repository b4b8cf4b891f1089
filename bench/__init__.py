"""Benchmarks of batch-upscaler against the Bedrock emulator: ``python -m bench <scenario>|all [--smoke]``.

Scenarios (one module each): ``known`` (fixed rate at a known quota), ``auto`` (adaptive rate,
unknown quota), ``cold`` (a short ``auto`` run from a cold start, against botocore's adaptive
mode), ``remembered`` (the next runs of that job, started from a remembered rate), ``baselines``
(the loops a user would otherwise write), ``cost`` (client CPU and memory per realistic image) and
``scale`` (100,000-file discovery and resume). Results are printed as tables and saved as JSON
under ``bench/out/``. See docs/benchmarks.md.
"""
