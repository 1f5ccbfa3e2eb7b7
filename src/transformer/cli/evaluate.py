"""``transformer-evaluate``: score a checkpoint (or an ensemble) on a split or on files
(evaluate.evaluate) and print BLEU, chrF2 and where the hypotheses went."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from transformer.allocator import use_fast_allocator
from transformer.cli import decode_config, hydra_entry, quiet_logging


def command(cfg: DictConfig) -> dict:
    """The command's body: the scores printed and returned (a sweeper can read them)."""
    quiet_logging()
    from transformer.evaluate import evaluate

    data = OmegaConf.to_object(cfg.data) if cfg.src_file is None else None
    result = evaluate(
        cfg.checkpoint,
        data=data,
        split=cfg.split,
        src_file=cfg.src_file,
        ref_file=cfg.ref_file,
        decode=decode_config(cfg),
        output=cfg.output,
        device=cfg.device,
        ensemble=list(cfg.ensemble),
    )
    print(result["bleu_detail"])
    print(f"chrF2 = {result['chrf']:.2f}  ({result['chrf_signature']})")
    print(f"BLEU (lowercased) = {result['bleu_lc']:.2f}")
    print(f"hypotheses: {result['hypotheses_file']}")
    return result


def main() -> None:
    """The transformer-evaluate command, under mimalloc as transformer-decode (cli/decode.py)."""
    use_fast_allocator()
    hydra_entry("evaluate", command)


if __name__ == "__main__":
    main()
