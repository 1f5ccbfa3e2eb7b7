"""transformer-serve, runnable from a checkout: python scripts/serve.py checkpoint=RUN key=value ..."""

from transformer.cli import serve_cli

if __name__ == "__main__":
    serve_cli()
