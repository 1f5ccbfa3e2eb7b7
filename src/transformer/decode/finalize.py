"""Finishing beam search hypotheses and deciding when a sentence may stop (fairseq's
finalisation apart from its ranking): a candidate ending in EOS among a sentence's first k
becomes a hypothesis scored log_prob / length_penalty, and a sentence stops by the rule of
``Finished.done``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.decode.ranking import Candidates
from transformer.decode.rows import Rows
from transformer.decode.rules import NEG_INF, Hypothesis, length_penalty
from transformer.decode.spec import SearchSpec


@dataclass
class Finished:
    """The hypotheses finished so far per input sentence, and for the B' sentences still
    running the tally their stopping rule reads."""

    hypotheses: list[list[Hypothesis]]  # per input sentence
    best: Tensor  # (B', n_best) best finished scores so far, sorted, -inf padded
    count: Tensor  # (B',) hypotheses finished so far

    @classmethod
    def start(cls, batch: int, n_best: int, device: torch.device) -> Finished:
        best = torch.full((batch, n_best), NEG_INF, dtype=torch.float64, device=device)
        return cls([[] for _ in range(batch)], best, torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def running(self) -> int:
        return self.best.size(0)

    def add(self, rows: Rows, cands: Candidates, t: int, spec: SearchSpec) -> None:
        """EOS among a sentence's first k candidates, with a finite log-prob, is a finished
        hypothesis scored log_prob / penalty(t + 1) (fairseq's rule)."""
        k, eos = spec.beam_size, spec.specials.eos
        top = cands.score[:, :k]
        new_finished = (cands.token[:, :k] == eos) & torch.isfinite(top)  # (B', k)
        if not bool(new_finished.any()):
            return
        new_scores = top.double() / length_penalty(t + 1, spec.length_penalty, spec.lp_style)  # (B', k)
        which, col = new_finished.nonzero().unbind(1)
        ended = cands.row[which, col]
        prefixes, prefix_lps = rows.tokens[ended, 1:].tolist(), rows.token_lps[ended].tolist()
        links = rows.links[ended].tolist() if rows.links is not None else [None] * ended.numel()
        for i, j, row, toks, lps, link in zip(
            which.tolist(), col.tolist(), ended.tolist(), prefixes, prefix_lps, links
        ):
            self.hypotheses[int(rows.origin[row])].append(
                Hypothesis(
                    tokens=toks + [eos],
                    score=float(new_scores[i, j]),
                    log_prob=float(top[i, j]),
                    token_log_probs=lps + [float(cands.token_lp[i, j])],
                    constraints_met=rows.constraints is None or rows.constraints[row].done,
                    alignment=link,
                )
            )
        entering = new_scores.masked_fill(~new_finished, NEG_INF)
        self.best = torch.cat([self.best, entering], dim=1).topk(self.best.size(1), dim=1).values
        self.count = self.count + new_finished.sum(dim=1)

    def done(self, live: Tensor, max_len: Tensor, length: int, spec: SearchSpec) -> Tensor:
        """Which running sentences can stop (B'), their live beams' log-probs ``live`` (B', k)
        holding ``length`` tokens, ``max_len`` (B',) their limits.

        * A sentence always stops after the step at its maximum length (EOS was forced on every
          live beam) or when no beam has a finite log-prob left;
        * otherwise it needs at least k finished hypotheses (fairseq's rule), and with
          ``early_stop="exact"`` also that no live beam can still enter the n-best: log-probs
          only decrease, so a live beam's best reachable score is its log-prob divided by the
          largest penalty reachable for lengths up to the maximum (penalties are monotone in
          length, so that is one of the two ends of the range); the sentence stops once this
          bound is <= the n_best-th best finished score. ``early_stop="fairseq"`` skips that
          check: cheaper, and identical whenever the penalty does not grow with length (style
          "none", or alpha <= 0).
        """
        alpha, style = spec.length_penalty, spec.lp_style
        best_live = live.max(dim=1).values.double()  # (B',)
        done = (max_len <= length) | (best_live == NEG_INF)  # EOS was forced everywhere, or nothing is alive
        enough = self.count >= spec.beam_size
        if spec.early_stop == "fairseq":
            return done | enough
        # Over lengths length+1 .. max_len the penalty is monotone, so x / lp(L) peaks at an end.
        bound = torch.maximum(
            best_live / length_penalty(length + 1, alpha, style), best_live / length_penalty(max_len, alpha, style)
        )
        return done | (enough & (bound <= self.best[:, -1]))

    def keep(self, running: Tensor) -> None:
        """Only the sentences ``running`` (B',) bool stay in the tally."""
        self.best, self.count = self.best[running], self.count[running]

    def ranked(self, n_best: int) -> list[list[Hypothesis]]:
        """Each sentence's ``n_best`` hypotheses, those that met their constraints first, best first."""
        return [sorted(h, key=lambda h: (h.constraints_met, h.score), reverse=True)[:n_best] for h in self.hypotheses]
