"""transformer-serve: translations over HTTP (FastAPI + uvicorn, the ``serve`` extra).

settings (the command's schema) -> metrics (Prometheus text) -> batcher (the decoding worker
that batches sentences across requests) -> models (checkpoints by name) -> app (routes,
limits, errors, the demo page in static/) -> server (uvicorn with a draining SIGTERM).
"""
