"""The text-similarity metrics of `text_similarity` graders, each in [0, 1], computed by well-kept libraries.

`fuzzy_match`: rapidfuzz's `WRatio` on lower-cased, punctuation-stripped text (`utils.default_process`), / 100.
`bleu`: sacrebleu's sentence BLEU (13a tokenizer, exponential smoothing), / 100. `gleu`: NLTK's sentence GLEU
(Google BLEU) on word tokens. `rouge_1` .. `rouge_5`, `rouge_l`: the F-measure of Google's `rouge-score`.
`meteor` needs WordNet, a corpus NLTK downloads at run time and no PyPI package ships, and `cosine` needs an
embedding model: both are refused with a 400 (`UNSUPPORTED`). `similarity` is the one entry point, so that other
evaluations (a supervised job's final BLEU and ROUGE-L) can use the same numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any

UNSUPPORTED = {
    "meteor": "The 'meteor' metric needs the WordNet corpus, which this service cannot download at run time "
    "and no installable package ships; use bleu, gleu, rouge_* or fuzzy_match.",
    "cosine": "The 'cosine' metric needs an embedding model, and none is configured on this service; use "
    "bleu, gleu, rouge_* or fuzzy_match.",
}
_WORDS = re.compile(r"\w+|[^\w\s]")


def similarity(metric: str, hypothesis: str, reference: str) -> float:
    """The score of `hypothesis` against `reference` by `metric`.

    Args:
        metric: an `evaluation_metric` other than those in `UNSUPPORTED`.
        hypothesis: the graded text (the rendered `input`).
        reference: the rendered `reference`.

    Returns:
        The score in [0, 1].

    Raises:
        KeyError: an unknown or unsupported metric (callers validate first).
    """
    score = _METRICS[metric](hypothesis, reference)
    return min(1.0, max(0.0, float(score)))


def _fuzzy(hypothesis: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return fuzz.WRatio(hypothesis, reference, processor=utils.default_process) / 100.0


def _bleu(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score) / 100.0


def _gleu(hypothesis: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    return float(sentence_gleu([_WORDS.findall(reference)], _WORDS.findall(hypothesis)))


@cache
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind])


def _rouge(kind: str) -> Callable[[str, str], float]:
    def score(hypothesis: str, reference: str) -> float:
        return float(_rouge_scorer(kind).score(reference, hypothesis)[kind].fmeasure)

    return score


_METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": _fuzzy,
    "bleu": _bleu,
    "gleu": _gleu,
    **{f"rouge_{n}": _rouge(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": _rouge("rougeL"),
}
