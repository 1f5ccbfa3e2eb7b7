"""transformer-evaluate, runnable from a checkout: python scripts/evaluate.py key=value ..."""

from transformer.cli.evaluate import main

if __name__ == "__main__":
    main()
