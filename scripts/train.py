"""transformer-train, runnable from a checkout: python scripts/train.py key=value ..."""

from transformer.cli import train_main

if __name__ == "__main__":
    train_main()
