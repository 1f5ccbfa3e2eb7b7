"""transformer-serve: translations over HTTP (FastAPI + uvicorn, the ``serve`` extra).

settings (the command's schema and its ranges) -> metrics (Prometheus text) -> api (request
fields, their limits and the answer) -> batcher (the thread that batches sentences across
requests and supervises the decoding process) -> models (checkpoints by name) -> worker (the
decoding child process) -> guard (Host, token, body reading) -> app (routes, errors, the
demo page in static/) -> server (uvicorn with connection limits and a draining SIGTERM).
The guide: docs/serving.md.
"""
