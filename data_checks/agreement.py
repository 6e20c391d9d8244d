"""Annotator agreement for preference labels with several annotators per pair.

A vote is coded by item identity, in an order that does not depend on the outcome: 1 = the
annotator preferred the pair's response that sorts first (by text), 0 = the other one.
Coding as chosen/rejected would be wrong: ``chosen`` is itself the majority of these votes, so
every pair has a chosen majority, the pooled marginals are skewed by construction and alpha
comes out negative for good annotators (the demo gives -0.17 that way, 0.41 this way).
Coding by display position would be wrong when the order shown differs between annotators.

- Overall: Krippendorff's alpha, nominal level (Krippendorff 2011, "Computing Krippendorff's
  Alpha-Reliability", https://repository.upenn.edu/asc_papers/43), computed by the
  ``krippendorff`` package from per-pair value counts, so the cost is O(pairs), not
  O(annotators x pairs).
- Per annotator: (a) agreement with the majority of the *other* annotators of the same pair
  (pairs where the others tie are skipped), and (b) alpha with that annotator left out.
  An annotator is flagged when (a) is below an absolute floor or far below the median of
  the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class AnnotatorStats:
    annotator: str
    votes: int
    """Votes cast on pairs that at least one other annotator also labelled."""
    agreement_with_majority: float
    """Share of votes that match the majority of the other annotators (ties skipped); NaN if none."""
    alpha_without: float
    """Krippendorff's alpha of everyone else (leave this annotator out)."""
    flagged: bool = False
    reason: str = ""


@dataclass
class AgreementStats:
    alpha: float
    pairs: int
    """Pairs with at least two votes (the ones alpha can use)."""
    annotators: list[AnnotatorStats] = field(default_factory=list)

    def flagged(self) -> list[AnnotatorStats]:
        return [a for a in self.annotators if a.flagged]


def votes_frame(labels: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """(pair_id, annotator_id, vote) from labels joined to their pairs (pair_id, chosen, rejected).

    vote 1 = preferred the response whose text sorts first; labels of unknown pairs are dropped
    (the ``label_pair_exists`` rule reports them).
    """
    texts = pairs[["pair_id", "chosen", "rejected"]].astype(str).drop_duplicates("pair_id")
    m = labels[["pair_id", "annotator_id", "preferred"]].astype(str).merge(texts, on="pair_id")
    chosen_first = (m["chosen"] <= m["rejected"]).to_numpy()
    return pd.DataFrame({"pair_id": m["pair_id"], "annotator_id": m["annotator_id"],
                         "vote": ((m["preferred"] == "chosen").to_numpy() == chosen_first)
                         .astype(np.int64)})


def alpha_from_votes(votes: pd.DataFrame) -> float:
    """Nominal Krippendorff's alpha from (pair_id, vote) rows; NaN if nothing is pairable."""
    import krippendorff

    codes, _ = pd.factorize(votes["pair_id"])
    v = votes["vote"].to_numpy()
    n_chosen = np.bincount(codes, weights=v, minlength=codes.max() + 1 if len(codes) else 0)
    n_all = np.bincount(codes, minlength=len(n_chosen)).astype(np.float64)
    counts = np.stack([n_all - n_chosen, n_chosen], axis=1)  # (pairs, 2): votes for 0, for 1
    counts = counts[n_all >= 2]  # a unit with one vote has nothing to agree with
    if len(counts) == 0:
        return float("nan")
    values = counts
    if (values.sum(axis=0) == 0).any():
        # One value only: no expected disagreement, alpha is undefined (0/0). Perfect agreement
        # on a single value says nothing about reliability; report 1.0 as the package would not.
        return 1.0
    return float(krippendorff.alpha(value_counts=values, level_of_measurement="nominal"))


def majority_agreement(votes: pd.DataFrame) -> pd.DataFrame:
    """Per annotator: votes scored and the share agreeing with the majority of the others."""
    g = votes.groupby("pair_id")["vote"]
    n = g.transform("size").to_numpy()
    chosen = g.transform("sum").to_numpy()
    v = votes["vote"].to_numpy()
    others_n = n - 1
    others_chosen = chosen - v  # the others' votes for "chosen"
    # Majority of the others: 1 if more than half of them voted chosen, 0 if fewer, tie -> skip.
    margin = 2 * others_chosen - others_n
    scored = (others_n > 0) & (margin != 0)
    agree = np.where(margin > 0, v == 1, v == 0)
    df = pd.DataFrame({"annotator_id": votes["annotator_id"].to_numpy(),
                       "scored": scored, "agree": agree & scored, "pairable": others_n > 0})
    per = df.groupby("annotator_id").agg(votes=("pairable", "sum"), scored=("scored", "sum"),
                                         agree=("agree", "sum"))
    per["agreement_with_majority"] = np.where(per["scored"] > 0,
                                              per["agree"] / per["scored"].clip(lower=1), np.nan)
    return per


def annotator_agreement(votes: pd.DataFrame, *, min_agreement: float, max_gap: float,
                        min_votes: int) -> AgreementStats:
    """Overall alpha plus per-annotator statistics, flagging annotators far below the others.

    ``votes`` has columns pair_id, annotator_id, vote (see ``votes_frame``).

    An annotator with at least ``min_votes`` scored votes is flagged when their agreement with
    the majority of the others is below ``min_agreement``, or more than ``max_gap`` below the
    median agreement of the other annotators.
    """
    alpha = alpha_from_votes(votes)
    pairs = int((votes.groupby("pair_id").size() >= 2).sum())
    per = majority_agreement(votes)
    stats = []
    for annotator, row in per.iterrows():
        rate = float(row["agreement_with_majority"])
        others = per.drop(index=annotator)
        others = others[others["scored"] >= min_votes]["agreement_with_majority"].dropna()
        median_others = float(others.median()) if len(others) else float("nan")
        a = AnnotatorStats(annotator=str(annotator), votes=int(row["votes"]),
                           agreement_with_majority=rate,
                           alpha_without=alpha_from_votes(votes[votes["annotator_id"] != annotator]))
        if int(row["scored"]) >= min_votes and not np.isnan(rate):
            if rate < min_agreement:
                a.flagged, a.reason = True, (f"agrees with the majority of the others on "
                                             f"{rate:.1%} of votes, below {min_agreement:.0%}")
            elif not np.isnan(median_others) and median_others - rate > max_gap:
                a.flagged, a.reason = True, (f"agrees with the majority of the others on "
                                             f"{rate:.1%} of votes, {median_others - rate:.1%} "
                                             f"below the other annotators' median "
                                             f"{median_others:.1%}")
        stats.append(a)
    return AgreementStats(alpha=alpha, pairs=pairs, annotators=stats)
