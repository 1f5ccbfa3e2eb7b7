"""transformer-serve, runnable from a checkout: python scripts/serve.py checkpoint=RUN key=value ..."""

from transformer.cli import serve_main

if __name__ == "__main__":
    serve_main()
