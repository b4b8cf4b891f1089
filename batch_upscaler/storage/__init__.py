"""The storage edge: where sources are read from and where outputs and reports go, local or S3.

* :mod:`.base` — the contract: a source reader and an output store, as the pipeline sees them;
* :mod:`.local` and :mod:`.s3` — their implementations;
* :mod:`.edge` — a job's sources, output store and report target, opened together;
* :mod:`.urls` and :mod:`.names` — what a location is, and how items are named to people.

The scan, pool, report and unsent-output code use the contract only; this package and the
manifest parser are the only places that know what an ``s3://`` URL is. (Nothing is imported
here, so that settings can use :mod:`.urls` without importing the stores.)
"""
