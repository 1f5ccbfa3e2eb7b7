"""transformer-serve, runnable from a checkout: python scripts/serve.py checkpoint=RUN key=value ..."""

from transformer.cli.serve import main

if __name__ == "__main__":
    main()
