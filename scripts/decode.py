"""transformer-decode, runnable from a checkout: python scripts/decode.py key=value ..."""

from transformer.cli import decode_cli

if __name__ == "__main__":
    decode_cli()
