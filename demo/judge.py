"""Gold judge for the demo task: positive sentiment, minus a penalty for degenerate text.

The judge is what makes alignment measurable on the demo: the reward model only sees noisy
pairwise labels drawn from it (see ``demo/build.py``), and evaluation scores policy and SFT
samples with it directly. Sentiment comes from VADER (Hutto & Gilbert 2014), a lexicon rated
by humans that none of us wrote, in the spirit of TRL's classic positive-review task. The
repetition penalty stops the obvious hack ("great great great ...") from counting as a win.

Any callable ``(list[str]) -> list[float]`` can serve as a gold judge; the evaluate stage
imports it from ``evaluate.gold_judge`` ("module:function").
"""

from __future__ import annotations

import functools

from models.diagnostics import repetition_rate


@functools.lru_cache(maxsize=1)
def _analyzer():
    # Imported lazily: vaderSentiment reads its lexicon file on construction (~0.1 s).
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_judge(texts: list[str], repetition_weight: float = 2.0) -> list[float]:
    """Gold score in about [-3, 1]: VADER compound sentiment minus weighted repetition.

    Empty or whitespace-only completions score -1 (the worst sentiment), so that a policy
    cannot win by saying nothing.
    """
    analyzer = _analyzer()
    scores = []
    for text in texts:
        if not text.strip():
            scores.append(-1.0)
            continue
        compound = analyzer.polarity_scores(text)["compound"]
        scores.append(compound - repetition_weight * repetition_rate(text))
    return scores
