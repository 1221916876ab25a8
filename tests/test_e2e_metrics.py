"""lab/e2e_metrics.py against the official E2E scorer, tuetschek/e2e-metrics' measure_scores.py -p.

The official numbers below were measured with that repository at commit 1b9c4d87fd0bbb171ea966741cdc012588581ed4
(Python 3.11, OpenJDK 17; its git-LFS jars replaced by pycocoevalcap 1.2's, which have the same git blob hashes;
`future` installed and `skimage.draw` stubbed, as pycocotools imports it only to draw masks):

    ./measure_scores.py -p example-inputs/devel-conc.txt example-inputs/baseline-output.txt
    ./measure_scores.py -p test-refs-grouped.txt test-predictions.txt

where test-refs-grouped.txt and test-predictions.txt hold what `full_size_instances()` below builds from
../shared/data/e2e/test.txt (grouped references, a blank line between instances; one prediction a line). The script
prints four decimals; the unrounded values are from its own functions on the same files:

    python -c "import sys, measure_scores as m; _, r, s = m.load_data(*sys.argv[1:]);
               e = m.run_coco_eval(r, s).eval; e.update(m.run_pymteval(r, s)); print(e)" REFS PREDS
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from lab import e2e_metrics
from lab.e2e_metrics import (
    METRICS,
    MissingDependencyError,
    coco_scores,
    group_pairs,
    main,
    read_grouped_references,
    read_predictions,
    score,
)

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")

OFFICIAL = {
    # example-inputs: the script's README gives BLEU 0.7203 NIST 7.7889 METEOR 0.4801 ROUGE_L 0.7910 CIDEr 2.3039
    "example": {
        "BLEU": 0.7202928494322162,
        "NIST": 7.788887609555574,
        "METEOR": 0.4800716745732023,
        "ROUGE_L": 0.7909526131515365,
        "CIDEr": 2.303943135258847,
    },
    # printed: BLEU 0.9767 NIST 13.9262 METEOR 0.7080 ROUGE_L 0.9919 CIDEr 3.2727
    "test": {
        "BLEU": 0.9767037163540432,
        "NIST": 13.926171806889606,
        "METEOR": 0.7079607756717304,
        "ROUGE_L": 0.9919493699614501,
        "CIDEr": 3.272714641395957,
    },
}
TOLERANCE = {"BLEU": 5e-4, "NIST": 5e-3, "METEOR": 5e-4, "ROUGE_L": 5e-4, "CIDEr": 5e-4}

needs_coco = pytest.mark.skipif(
    shutil.which("java") is None or importlib.util.find_spec("pycocoevalcap") is None,
    reason="METEOR, ROUGE-L and CIDEr need Java and pycocoevalcap (CI installs both)",
)


def data(*parts: str) -> str:
    path = os.path.join(DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"the shared test data is absent: {path}")
    return path


def example_instances() -> tuple[list[str], list[list[str]]]:
    """The official script's own example: 10 development instances, the challenge baseline's outputs."""
    folder = data("e2e-metrics-example")
    references = read_grouped_references(os.path.join(folder, "devel-conc.txt"))
    return read_predictions(os.path.join(folder, "baseline-output.txt")), references


def full_size_instances() -> tuple[list[str], list[list[str]]]:
    """All 630 test contexts; the prediction of instance i is its reference i mod (number of references), with the
    middle word dropped from every third (i = 0, 3, 6, ...), so that no score is trivially perfect."""
    _, references = group_pairs(data("e2e", "test.txt"))
    predictions = []
    for i, instance in enumerate(references):
        words = instance[i % len(instance)].split(" ")
        if i % 3 == 0:
            del words[len(words) // 2]
        predictions.append(" ".join(words))
    return predictions, references


INSTANCES = {"example": example_instances, "test": full_size_instances}


def assert_official(scores: dict[str, float], case: str) -> None:
    for metric, value in scores.items():
        assert abs(value - OFFICIAL[case][metric]) <= TOLERANCE[metric], (metric, value, OFFICIAL[case][metric])


@pytest.mark.parametrize("case", ["example", "test"])
def test_bleu_and_nist_match_the_official_script(case):
    scores = score(*INSTANCES[case](), java=False)
    assert list(scores) == ["BLEU", "NIST"]
    assert_official(scores, case)


@pytest.fixture(scope="module", params=["example", "test"])
def five_scores(request) -> tuple[str, dict[str, float]]:
    """All five scores, once per case: METEOR's Java start-up alone costs seconds."""
    return request.param, score(*INSTANCES[request.param]())


@needs_coco
def test_all_five_match_the_official_script(five_scores):
    case, scores = five_scores
    assert list(scores) == list(METRICS)
    assert_official(scores, case)


@needs_coco
def test_one_meteor_process_scores_each_set_as_a_new_one_would():
    predictions, references = example_instances()
    first = coco_scores(predictions, references)
    assert e2e_metrics._meteor() is e2e_metrics._meteor()  # the JVM and its paraphrase tables, started once
    coco_scores(predictions[1:] + predictions[:1], references)  # another set between, through the same process
    assert coco_scores(predictions, references) == first


def test_group_pairs_on_the_e2e_splits():
    contexts, references = group_pairs(data("e2e", "test.txt"))
    assert len(contexts) == len(references) == 630
    assert sum(len(instance) for instance in references) == 4693
    assert len(group_pairs(data("e2e", "valid.txt"))[0]) == 547
    assert references[0] == [
        "A coffee shop in the city centre area called Blue Spice .",
        "Blue Spice is a coffee shop in city centre .",
    ]


def test_group_pairs_keeps_first_appearance_order_and_gathers_repeats():
    lines = ["b : 1||one . ", "a : 2||two", "", "b : 1 || uno"]
    assert group_pairs(lines) == (["b : 1", "a : 2"], [["one .", "uno"], ["two"]])
    with pytest.raises(ValueError, match="line 2 is not context"):
        group_pairs(["a||b", "no separator"])


def test_read_grouped_references(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("a 1\na 2\n\nb 1\n\nc 1\nc 2\nc 3\n\n")
    assert read_grouped_references(path) == [["a 1", "a 2"], ["b 1"], ["c 1", "c 2", "c 3"]]
    path.write_text("one\ntwo\n")  # no blank line: one reference per instance, as the official script reads it
    assert read_grouped_references(path) == [["one"], ["two"]]
    path.write_text("a\n\n\nb\n")
    with pytest.raises(ValueError, match="line 3: a blank line that ends no instance"):
        read_grouped_references(path)


def test_read_the_official_example():
    predictions, references = example_instances()
    assert len(predictions) == len(references) == 10
    assert predictions[0] == "Alimentum is located in the city centre. It is not family-friendly."


def test_missing_java_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    with pytest.raises(MissingDependencyError, match="need Java .* apt-get install default-jre-headless") as error:
        score(["a b"], [["a b"]])
    assert "\n" not in str(error.value)


def test_missing_pycocoevalcap_is_one_clear_error(tmp_path, monkeypatch):
    java = tmp_path / "java"  # only found, never run
    java.write_text("#!/bin/sh\nexit 1\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    for name in (
        "pycocoevalcap",
        "pycocoevalcap.cider.cider",
        "pycocoevalcap.meteor.meteor",
        "pycocoevalcap.rouge.rouge",
        "pycocoevalcap.tokenizer.ptbtokenizer",
    ):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: importing it raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install pycocoevalcap$"):
        score(["a b"], [["a b"]])


def test_cli_prints_the_scores_and_reads_pairs(tmp_path, capsys):
    predictions, references = example_instances()
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"mr {i}||{ref}\n" for i, instance in enumerate(references) for ref in instance))
    outputs = tmp_path / "outputs.txt"
    outputs.write_text("\n".join(predictions) + "\n")
    main(["--pairs", str(pairs), str(outputs), "--no-java"])
    assert capsys.readouterr().out == "BLEU: 0.7203\nNIST: 7.7889\n"


def test_cli_errors_are_one_line(tmp_path):
    references, outputs = tmp_path / "refs.txt", tmp_path / "outputs.txt"
    references.write_text("a\nb\n\nc\n")
    outputs.write_text("a\nb\nc\n")
    with pytest.raises(SystemExit, match="^lab.e2e_metrics: error: 3 predictions for 2 instances of references$"):
        main([str(references), str(outputs), "--no-java"])
    run = subprocess.run(
        [sys.executable, "-m", "lab.e2e_metrics", str(references), str(tmp_path / "absent.txt")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("lab.e2e_metrics: error: ") and run.stderr.count("\n") == 1, run.stderr
