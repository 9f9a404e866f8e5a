"""Synthetic long-range tasks: deterministic (same seed, same bytes) and correct by construction
(each answer/label is re-derived from the text alone, or from the text and the style models)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from data_pipeline.__main__ import main
from data_pipeline.loader import build_dataloader
from data_pipeline.synthetic import GENERATORS, generate, make_generator
from data_pipeline.synthetic.passkey import FILLER, HEADER, QUESTION
from data_pipeline.tasks import read_task_file
from data_pipeline.tokenizer import load_tokenizer

SMALL = {  # knobs that keep every task small enough for a unit test
    "passkey": {"lengths": (400, 1024, 2048), "depths": (0.0, 0.5, 1.0)},
    "two-style-4k": {}, "two-style-16k": {"min_length": 2000, "max_length": 2400},
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, name, capsys):
    knob_args = {"passkey": ["--lengths", "400,1024", "--depths", "0,0.5,1"],
                 "two-style-16k": ["--min-length", "2000", "--max-length", "2400"]}.get(name, [])
    paths = []
    for run, seed in ((0, 7), (1, 7), (2, 8)):
        path = tmp_path / f"{run}.jsonl"
        assert main(["synth", name, "--out", str(path), "--n", "12", "--seed", str(seed), *knob_args]) == 0
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert [r["split"] for r in rows] == ["train"] * 12 + ["val"] + ["test"]
    assert json.loads((tmp_path / "0.jsonl.synth.json").read_text())["seed"] == 7
    # an example does not depend on how many others are drawn
    assert list(generate(name, 3, 7, 0, 0, **SMALL.get(name, {}))) == \
        list(generate(name, 5, 7, 0, 0, **SMALL.get(name, {})))[:3]


def test_mqar_answers_rederived_from_text():
    gen = make_generator("mqar")
    lags = {"train": [], "test": []}
    for e in generate("mqar", 300, 0, 0, 300):
        context, queries = gen.parse(e["prompt"])
        assert len(context) == gen.pairs and len(queries) == gen.queries == len(set(queries))
        assert e["answer"] == "".join(context[q] for q in queries)
        keys = [e["prompt"][i:i + 1] for i in range(0, 2 * gen.pairs, 2)]
        pair_lags = [gen.pairs - 1 - keys.index(q) for q in queries]
        assert pair_lags == e["lags"] and e["lag"] == max(pair_lags)
        lags[e["split"]] += pair_lags
    assert max(lags["train"]) == gen.max_lag
    assert max(lags["test"]) == 4 * gen.max_lag  # test lags up to 4x the longest trained lag


def test_diffuse_mqar_distractors_and_controlled_lag():
    gen = make_generator("diffuse-mqar")
    assert (gen.key_len, gen.distractors, gen.queries) == (3, 4, 1)
    lags = {"train": set(), "val": set(), "test": set()}
    for e in generate("diffuse-mqar", 200, 1, 50, 200):
        context, (query,) = gen.parse(e["prompt"])
        assert e["answer"] == context[query] and len(e["answer"]) == gen.value_len
        keys = list(context)
        assert len(keys) == gen.pairs  # every key distinct
        sharing = [k for k in keys if k[:-1] == query[:-1] and k != query]
        assert len(sharing) == gen.distractors  # exactly `distractors` keys share its prefix ...
        assert all(context[k] != e["answer"] for k in sharing)  # ... with other values
        assert e["lag"] == gen.pairs - 1 - keys.index(query)
        lags[e["split"]].add(e["lag"])
    assert max(lags["train"]) <= gen.max_lag and max(lags["val"]) <= gen.max_lag
    assert max(lags["test"]) > 3 * gen.max_lag and max(lags["test"]) <= 4 * gen.max_lag


def log_likelihood(gen, text: str, style) -> float:
    """log p(text | style) under the style's Markov part with the symbol noise (motifs ignored), from
    the model in data_pipeline/synthetic/styles.py's docstring."""
    V, total, prev = len(gen.alphabet), 0.0, None
    for i in (gen.alphabet.index(ch) for ch in text):
        markov = (style.unigram if prev is None
                  else (1 - gen.bigram_weight) * style.unigram + gen.bigram_weight * style.bigram[prev])
        total += float(np.log((1 - gen.noise) * markov[i] + gen.noise / V))
        prev = i
    return total


@pytest.mark.parametrize("name,lo,hi", [("two-style", 400, 600), ("two-style-4k", 3276, 4915)])
def test_two_style_labels_rederived_by_the_bayes_classifier(name, lo, hi):
    gen = make_generator(name)
    assert len(gen.labels()) == 20  # families of 4 and 5 styles
    examples = list(generate(name, 60, 3, 0, 0))
    right = 0
    for e in examples:
        text = e["prompt"]
        assert lo <= len(text) == e["length"] <= hi and set(text) <= set(gen.alphabet)
        a_block = text[e["a_start"]:e["a_start"] + e["a_len"]]
        b_block = text[e["b_start"]:e["b_start"] + e["b_len"]]
        first, second = sorted([(e["a_start"], e["a_len"]), (e["b_start"], e["b_len"])])
        assert e["position"] == first[0] and e["gap"] == second[0] - first[0] - first[1]
        assert e["order"] == ("AB" if e["a_start"] < e["b_start"] else "BA")
        a = max(range(4), key=lambda i: log_likelihood(gen, a_block, gen.styles[0][i]))
        b = max(range(5), key=lambda j: log_likelihood(gen, b_block, gen.styles[1][j]))
        right += gen.label(a, b) == e["answer"]
    assert right >= 0.95 * len(examples)  # the label is in the blocks (noise is 3%)
    labels = [e["answer"] for e in generate(name, 400, 4, 0, 0)]
    assert len(set(labels)) == 20 and {e["order"] for e in examples} == {"AB", "BA"}


def test_passkey_and_selective_copy_answers_rederived_from_text():
    cells = set()
    for e in generate("passkey", 60, 0, 0, 0, **SMALL["passkey"]):
        text = e["prompt"]
        keys = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", text)
        assert keys == [(e["answer"], e["answer"])] and len(e["answer"]) == 5
        assert len(text) == e["length"] and text.startswith(HEADER) and text.endswith(QUESTION)
        assert text.index(" The pass key") == e["position"]
        assert FILLER[:20] in text or e["length"] < 300
        cells.add((e["length"], e["depth"]))
    assert cells == {(n, d) for n in (400, 1024, 2048) for d in (0.0, 0.5, 1.0)}
    long = next(generate("passkey", 1, 0, 0, 0, lengths=(131072,), depths=(0.5,)))
    assert len(long["prompt"]) == 131072 and long["position"] > 60000

    gen = make_generator("selective-copy")
    for e in generate("selective-copy", 50, 0, 0, 0):
        assert len(e["prompt"]) == gen.length
        assert e["answer"] == e["prompt"].replace(gen.blank, "") and len(e["answer"]) == gen.tokens
        where = [i for i, c in enumerate(e["prompt"]) if c != gen.blank]
        assert e["position"] == where[0] and e["span"] == where[-1] - where[0]


def test_synth_to_shards_equals_task_file_then_prepare(tmp_path, capsys):
    common = ["--n", "30", "--seed", "5", "--pairs", "16", "--max-lag", "3"]
    assert main(["synth", "diffuse-mqar", "--out", str(tmp_path / "direct"), *common]) == 0
    assert main(["synth", "diffuse-mqar", "--out", str(tmp_path / "t.tsv"), *common]) == 0
    direct = json.loads((tmp_path / "direct" / "manifest.json").read_text())
    assert direct["seq_len"] == 128 and direct["loss_mask"] and direct["pack"] == "none"
    assert direct["sources"][0]["synthetic"] == "diffuse-mqar" and direct["sources"][0]["knobs"]["pairs"] == 16
    assert main(["prepare", "--source", str(tmp_path / "t.tsv"), "--format", "task", "--prompt-field", "prompt",
                 "--answer-field", "answer", "--split-field", "split", "--tokenizer", "chars", "--seq-len", "128",
                 "--out", str(tmp_path / "prepared"), "--workers", "1", "--no-progress"]) == 0
    prepared = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        assert [s["sha256"] for s in direct["splits"][split]["shards"]] == \
            [s["sha256"] for s in prepared["splits"][split]["shards"]]
    # decode the shards: every test example is there, with its answer as the masked part
    examples = {e.prompt: e for e in read_task_file(tmp_path / "t.tsv", "prompt", "answer", "split")}
    tok = load_tokenizer("chars")
    loader = build_dataloader(tmp_path / "direct", "test", 2, 0, 1, 0, seed=0, infinite=False, lanes=1)
    n = 0
    for batch in loader:
        for tokens, mask in zip(batch["tokens"], batch["loss_mask"]):
            prompt = tok.decode(tokens[:int(np.argmax(tokens.numpy() == 10))].tolist())
            answer = tok.decode(tokens[mask].tolist())
            assert answer == examples[prompt].answer + "<|endoftext|>" and examples[prompt].split == "test"
            assert int(examples[prompt].fields["lag"]) <= 12
            n += 1
    assert n == 3


def test_bad_knobs_and_unknown_task_are_clear():
    with pytest.raises(ValueError, match="unknown synthetic task 'mqar2'; known: mqar, diffuse-mqar"):
        make_generator("mqar2")
    with pytest.raises(ValueError, match="pairs=8 is too few: test lags reach 28"):
        make_generator("mqar", pairs=8)
    with pytest.raises(ValueError, match="need key_len >= 2"):
        make_generator("mqar", distractors=2)
    with pytest.raises(ValueError, match="lengths must be >= "):
        make_generator("passkey", lengths=(100,))
