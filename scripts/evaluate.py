"""transformer-evaluate, runnable from a checkout: python scripts/evaluate.py key=value ..."""

from transformer.cli import evaluate_cli

if __name__ == "__main__":
    evaluate_cli()
