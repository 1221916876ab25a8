"""The E2E NLG challenge's five metrics, computed as the official script computes them.

The official scorer is `measure_scores.py` of tuetschek/e2e-metrics. The LoRA paper's authors ran it with `-p`
("python mode"), which this file follows:

- BLEU and NIST from its Python port of mteval-v13a, `metrics/pymteval.py`: mteval's own tokenization,
  case-insensitive n-gram matching, corpus-level counts, no smoothing. We port the two scorers below.
- METEOR, ROUGE-L and CIDEr from its copy of the MS-COCO caption evaluation code: every sentence through the
  Stanford PTB tokenizer (lowercased, punctuation dropped), then METEOR 1.5, ROUGE-L and CIDEr. We call the
  same code from the `pycocoevalcap` package (identical scorers, the same jars); it needs Java.

Scores are on the script's scale: BLEU 0.7203, NIST 7.7889, METEOR 0.4801, ROUGE_L 0.7910, CIDEr 2.3039 (its
own example: 10 development instances, the challenge baseline's outputs).

Inputs: one prediction a line; references grouped per instance, one a line, a blank line between instances
(the official format), or the LoRA authors' `context||target` lines, several lines per context (`group_pairs`).

    python -m lab.e2e_metrics references.txt predictions.txt
    python -m lab.e2e_metrics --pairs data/e2e/test.txt predictions.txt
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable

from lab import command_line

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


# --- Reading the data --------------------------------------------------------------------------------------


def _read_lines(path: str | os.PathLike) -> list[str]:
    # measure_scores.py's read_lines strips every line; str.splitlines breaks lines where its codecs reader does.
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines()]


def read_predictions(path: str | os.PathLike) -> list[str]:
    """One prediction per line, stripped; an empty line is an (empty) prediction, as in measure_scores.py."""
    return _read_lines(path)


def read_grouped_references(path: str | os.PathLike) -> list[list[str]]:
    """References grouped per instance: one a line, a blank line between instances (measure_scores.py's
    read_lines with multi_ref=True). A file without any blank line holds one reference per instance, as the
    official script reads it too."""
    instances: list[list[str]] = [[]]
    for number, line in enumerate(_read_lines(path), start=1):
        if line:
            instances[-1].append(line)
        elif instances[-1]:
            instances.append([])
        else:  # the official script would make an instance without references here, and fail later
            raise ValueError(f"{path}, line {number}: a blank line that ends no instance")
    if not instances[-1]:
        del instances[-1]
    if len(instances) == 1:
        return [[reference] for reference in instances[0]]
    return instances


def group_pairs(lines_or_path: str | os.PathLike | Iterable[str]) -> tuple[list[str], list[list[str]]]:
    """The LoRA authors' `context||target` lines (a path, or the lines themselves) as the contexts in order of
    first appearance and, for each, all its targets: the references of one instance."""
    lines = _read_lines(lines_or_path) if isinstance(lines_or_path, (str, os.PathLike)) else lines_or_path
    references: dict[str, list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        context, separator, target = line.partition("||")
        if not separator:
            raise ValueError(f"line {number} is not context||target: {line.strip()[:80]!r}")
        references.setdefault(context.strip(), []).append(target.strip())
    return list(references), list(references.values())


# --- BLEU and NIST: a port of the official metrics/pymteval.py (BLEUScore, NISTScore) -------------------------
# measure_scores.py -p calls them with their defaults: BLEU up to 4-grams, NIST up to 5-grams, case-insensitive.


def mteval_tokenize(sentence: str) -> list[str]:
    """mteval-v13a's tokenization as pymteval's NGramScore.tokenize writes it, lowercased (pymteval lowercases
    the tokens when it counts n-grams). An empty sentence is one empty token, as there."""
    for old, new in (
        ("<skipped>", ""),
        ("-\n", ""),
        ("\n", " "),
        ("&quot;", '"'),
        ("&amp;", "&"),
        ("&lt;", "<"),
        ("&gt;", ">"),
    ):
        sentence = sentence.replace(old, new)
    sentence = f" {sentence} "
    sentence = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", sentence)  # punctuation
    sentence = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", sentence)  # period and comma unless after a digit
    sentence = re.sub(r"([\.,])([^0-9])", r" \1 \2", sentence)  # ... unless before a digit
    sentence = re.sub(r"([0-9])(-)", r"\1 \2 ", sentence)  # dash after a digit
    sentence = re.sub(r"\s+", " ", sentence)
    return [token.lower() for token in sentence.strip().split(" ")]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(zip(*(tokens[i:] for i in range(n))))


def _clipped_hits(tokens: list[str], references: list[list[str]], n: int) -> Counter:
    """The prediction's n-grams, each counted at most as often as in the one reference that has it most."""
    most = Counter()
    for reference in references:
        most |= _ngrams(reference, n)
    return _ngrams(tokens, n) & most


def bleu(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 as pymteval's BLEUScore(): clipped n-gram precisions over the whole corpus, their geometric
    mean, and a brevity penalty against, per sentence, the reference closest in length (the shorter on a tie)."""
    hits, lengths, reference_length = [0] * 4, [0] * 4, 0
    for prediction, instance in zip(predictions, references, strict=True):
        tokens, instance_tokens = mteval_tokenize(prediction), [mteval_tokenize(ref) for ref in instance]
        for n in range(1, 5):
            hits[n - 1] += sum(_clipped_hits(tokens, instance_tokens, n).values())
            lengths[n - 1] += len(tokens) - n + 1  # may go below zero for short outputs, as in pymteval
        reference_length += len(min(instance_tokens, key=lambda ref: (abs(len(ref) - len(tokens)), len(ref))))
    # pymteval's floors only keep the logarithm defined when nothing matched; there is no other smoothing.
    log_precision = sum(math.log(max(hit, 1e-15) / max(length, 1e-9)) for hit, length in zip(hits, lengths)) / 4
    brevity_penalty = 1.0
    if lengths[0] <= reference_length:
        brevity_penalty = math.exp(1.0 - reference_length / (lengths[0] or 1e-5))
    return brevity_penalty * math.exp(log_precision)


# mteval-v13a's beta: the length penalty is 0.5 when the output is 2/3 as long as the average reference.
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def nist(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus NIST-5 as pymteval's NISTScore(): every clipped n-gram hit weighs its information,
    log2(count(w1..wn-1) / count(w1..wn)) over all references of the corpus (for unigrams: total reference
    words / count(w1)); per n the weights are summed and divided by the output's n-gram count; the five terms
    are summed and multiplied by a length penalty against the mean per-instance average reference length."""
    counts = [Counter() for _ in range(6)]  # counts[n]: n-gram counts over every reference; counts[0][()]: words
    hits = [Counter() for _ in range(5)]
    lengths = [0] * 5
    average_reference_length = 0.0
    for prediction, instance in zip(predictions, references, strict=True):
        tokens, instance_tokens = mteval_tokenize(prediction), [mteval_tokenize(ref) for ref in instance]
        for n in range(1, 6):
            lengths[n - 1] += len(tokens) - n + 1
            hits[n - 1].update(_clipped_hits(tokens, instance_tokens, n))
            for reference in instance_tokens:
                counts[n].update(_ngrams(reference, n))
        words = sum(len(reference) for reference in instance_tokens)
        counts[0][()] += words
        average_reference_length += words / len(instance_tokens)
    information = [
        sum(math.log2(counts[n - 1][ngram[:-1]] / counts[n][ngram]) * hit for ngram, hit in hits[n - 1].items())
        for n in range(1, 6)
    ]
    ratio = lengths[0] / average_reference_length
    length_penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-NIST_BETA * math.log(ratio) ** 2)
    # pymteval divides by zero when the outputs hold no n-gram of some size (all shorter than n): that term is 0 here
    return length_penalty * sum(info / length if length else 0.0 for info, length in zip(information, lengths))


# --- METEOR, ROUGE-L and CIDEr: the COCO caption code, as measure_scores.py's run_coco_eval calls it -----------


class MissingDependencyError(OSError):
    """Java or the pycocoevalcap package, which METEOR, ROUGE-L and CIDEr need, is missing."""


@functools.cache
def _meteor():
    """One METEOR 1.5 process for every scoring of this Python process: its JVM starts and loads the paraphrase
    tables once. Each compute_score sends its own segments and aggregates only them (-stdio), so a scorer used
    before gives what a new one gives."""
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def coco_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """METEOR, ROUGE-L and CIDEr as measure_scores.py gets them: references and predictions each through the
    PTB tokenizer, then each scorer's corpus score (METEOR's is the jar's aggregate over all segments'
    statistics; ROUGE-L's and CIDEr's are means over instances)."""
    if shutil.which("java") is None:
        raise MissingDependencyError(
            "METEOR, ROUGE-L and CIDEr need Java (the COCO caption code's PTB tokenizer and METEOR run on it): "
            "install a JRE, e.g. apt-get install default-jre-headless"
        )
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise MissingDependencyError(
            "METEOR, ROUGE-L and CIDEr need the COCO caption code: pip install pycocoevalcap"
        ) from None
    # measure_scores.py goes through pycocotools' COCO and its COCOEvalCap, whose evaluate() does what follows
    # on ids inst-0, inst-1, ... in order. pycocoevalcap's own COCOEvalCap would also run BLEU and SPICE.
    ids = [f"inst-{i}" for i in range(len(predictions))]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({id_: [{"caption": ref} for ref in refs] for id_, refs in zip(ids, references)})
    res = tokenizer.tokenize({id_: [{"caption": prediction}] for id_, prediction in zip(ids, predictions)})
    scorers = {"METEOR": _meteor(), "ROUGE_L": Rouge(), "CIDEr": Cider()}
    return {name: float(scorer.compute_score(gts, res)[0]) for name, scorer in scorers.items()}


def score(predictions: list[str], references: list[list[str]], java: bool = True) -> dict[str, float]:
    """The five E2E metrics (keys in METRICS), as `measure_scores.py -p` prints them. One prediction per
    instance, each instance with at least one reference. java=False gives BLEU and NIST only."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} instances of references")
    if not all(references):
        raise ValueError(f"instance {[bool(refs) for refs in references].index(False)} has no reference")
    coco = coco_scores(predictions, references) if java else {}
    return {"BLEU": bleu(predictions, references), "NIST": nist(predictions, references), **coco}


# --- Command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = command_line("lab.e2e_metrics", __doc__)
    parser.add_argument(
        "references",
        metavar="REFERENCES",
        help="human references, one a line, a blank line between instances (the official "
        "format); with --pairs, context||target lines",
    )
    parser.add_argument(
        "predictions",
        metavar="PREDICTIONS",
        help="system outputs, one a line, in the order of the instances in REFERENCES",
    )
    parser.add_argument(
        "--pairs",
        action="store_true",
        help="REFERENCES holds context||target lines (the LoRA authors' data/e2e/*.txt); the "
        "instances are its distinct contexts, in order of first appearance",
    )
    parser.add_argument("--no-java", action="store_true", help="BLEU and NIST only: pure Python, no Java needed")
    args = parser.parse_args(argv)
    try:
        references = group_pairs(args.references)[1] if args.pairs else read_grouped_references(args.references)
        scores = score(read_predictions(args.predictions), references, java=not args.no_java)
    except (ValueError, OSError) as e:
        sys.exit(f"lab.e2e_metrics: error: {e}")
    for name, value in scores.items():
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    main()
