"""transformer-decode, runnable from a checkout: python scripts/decode.py key=value ..."""

from transformer.cli.decode import main

if __name__ == "__main__":
    main()
