"""transformer-import, runnable from a checkout: python scripts/import_hf.py hf=DIR output=CKPT.pt"""

from transformer.cli.import_hf import main

if __name__ == "__main__":
    main()
