"""Scores of generated text and predicted labels: exact match, BLEU, ROUGE, accuracy, F1.

BLEU is sacrebleu's corpus BLEU (13a tokenization; its `zh` tokenization, one token
per Chinese character, when a reference holds CJK characters); ROUGE is Google's
`rouge-score` (the reference re-implementation of ROUGE-1.5.5), mean F-measure of
rouge1 / rouge2 / rougeL, with a tokenizer that keeps every script (rouge-score's own
keeps only a-z and 0-9, so Chinese, Japanese, Cyrillic... scored 0): words are runs of
letters and digits, lowercased, and each CJK ideograph or kana is a word of its own;
ASCII text tokenizes exactly as rouge-score's default. F1 is computed here (see
`classification_scores`). Every
score is in [0, 100] except accuracy and F1 in [0, 1].

Example:
    >>> generation_scores(["4", "cba"], ["4", "abc"])["exact_match"]
    50.0
"""

from __future__ import annotations

import re

from deepseek_tf.data.records import normalize_answer as normalize  # noqa: F401 (tasks)

#: Scripts written without spaces between words: one token per character (CJK
#: ideographs and their extensions, compatibility ideographs, hiragana, katakana).
CJK = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                 "\U00020000-\U0002fa1f]")
#: A word: a CJK character, or a run of letters/digits of any other script.
_WORD = re.compile(f"{CJK.pattern}|(?:(?!{CJK.pattern})[^\\W_])+")


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference (after `normalize`)."""
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references))
    return 100.0 * hits / max(len(references), 1)


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (one reference per prediction)."""
    import sacrebleu

    tokenize = "zh" if any(CJK.search(r) for r in references) else "13a"
    return float(sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score)


class RougeTokenizer:
    """rouge-score tokenizer for every script (see the module doc).

    Example:
        >>> RougeTokenizer().tokenize("The cat 坐在 mat.")
        ['the', 'cat', '坐', '在', 'mat']
    """

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean F-measure (x100) of rouge1, rouge2 and rougeL."""
    from rouge_score import rouge_scorer

    names = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(names), tokenizer=RougeTokenizer())
    sums = dict.fromkeys(names, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)
        for n in names:
            sums[n] += scores[n].fmeasure
    return {n: 100.0 * sums[n] / max(len(references), 1) for n in names}


def generation_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """exact_match, bleu, rouge1, rouge2, rougeL of predictions against references."""
    return {"exact_match": exact_match(predictions, references),
            "bleu": bleu(predictions, references), **rouge(predictions, references)}


def classification_scores(truth: list[str], predicted: list[str]) -> dict[str, float]:
    """accuracy, macro_f1 and micro_f1 of predicted labels.

    F1 per label over every label seen in `truth` or `predicted` (a label with no true
    and no predicted positives scores 0, as scikit-learn's `zero_division=0`); macro is
    their mean, micro pools the counts (for one label per example it equals accuracy).
    """
    n = len(truth)
    if n != len(predicted):
        raise ValueError(f"{n} true labels but {len(predicted)} predictions")
    hits = sum(t == p for t, p in zip(truth, predicted))
    f1s = []
    for label in sorted(set(truth) | set(predicted)):
        tp = sum(t == p == label for t, p in zip(truth, predicted))
        fp = sum(p == label != t for t, p in zip(truth, predicted))
        fn = sum(t == label != p for t, p in zip(truth, predicted))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    accuracy = hits / n if n else 0.0
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "micro_f1": accuracy}
