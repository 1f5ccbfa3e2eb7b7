"""transformer-train, runnable from a checkout: python scripts/train.py key=value ..."""

from transformer.cli.train import main

if __name__ == "__main__":
    main()
