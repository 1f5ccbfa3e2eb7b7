"""transformer-train, runnable from a checkout: python scripts/train.py key=value ..."""

from transformer.cli import train_cli

if __name__ == "__main__":
    train_cli()
