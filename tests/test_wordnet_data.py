"""examples/pretrain/wordnet_data.py on a tiny WordNet folder written here, in the package's format."""

import csv
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "pretrain"))
import wordnet_data  # noqa: E402

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University\n"
#: lexicographer file numbers and names as lexnames(5WN) gives them (the ones used here)
NAMES = {0: "adj.all", 2: "adv.all", 5: "noun.animal", 6: "noun.artifact", 38: "verb.motion", 44: "adj.ppl"}


def offsets_in(split, count, start):
    """`count` synset offsets (as pos "n") that the script puts into `split`."""
    found, offset = [], start
    while len(found) < count:
        if wordnet_data.split_of(f"n:{offset:08d}") == split:
            found.append(offset)
        offset += 1
    return found


def noun_line(offset, lex, words, gloss):
    listed = " ".join(f"{w} 0" for w in words)
    pointers = f"002 @ 00001740 n 0000 ~ {offset + 1:08d} n 0000"  # (two pointers, as real lines have)
    return f"{offset:08d} {lex:02d} n {len(words):02x} {listed} {pointers} | {gloss}  \n"


@pytest.fixture
def wordnet(tmp_path):
    """A WordNet folder: nouns in every split, a verb with frames, an adjective satellite, an
    adverb; a definition shared across splits; a non-test example that quotes a test definition."""
    folder = tmp_path / "wordnet"
    folder.mkdir()
    test, train = offsets_in("test", 6, 2000000), offsets_in("train", 20, 3000000)
    validation = offsets_in("validation", 4, 4000000)
    nouns, expected = [], {}  # synset -> (label, definition, examples)
    for k, offset in enumerate(test):
        definition = f"a test animal number {k} with a long definition"
        nouns.append(noun_line(offset, 5, [f"test_beast_{k}", "brute"], f'{definition}; "the test beast {k} ran away"'))
        expected[f"n:{offset:08d}"] = ("noun.animal", definition, [f"the test beast {k} ran away"])
    for k, offset in enumerate(train + validation):
        definition = f"a made thing number {k} for training"
        nouns.append(noun_line(offset, 6, [f"gadget_{k}"], f'{definition}; "she used gadget {k}"; "another {k}"'))
        expected[f"n:{offset:08d}"] = ("noun.artifact", definition, [f"she used gadget {k}", f"another {k}"])
    # a train synset whose example quotes the first test definition, and one that shares it
    leak, shared = train[-1], train[-2]
    quoted = f"he said it was {expected[f'n:{test[0]:08d}'][1]} indeed"
    nouns[len(test) + len(train) - 1] = noun_line(leak, 6, ["leaky"], f'a leaky thing; "{quoted}"')
    expected[f"n:{leak:08d}"] = ("noun.artifact", "a leaky thing", [quoted])
    nouns[len(test) + len(train) - 2] = noun_line(shared, 6, ["twin"], expected[f"n:{test[1]:08d}"][1])
    expected[f"n:{shared:08d}"] = ("noun.artifact", expected[f"n:{test[1]:08d}"][1], [])
    (folder / "data.noun").write_text(HEADER + "".join(nouns))
    (folder / "data.verb").write_text(
        HEADER + "01904930 38 v 02 walk 0 go_on_foot 0 001 @ 01835496 v 0000 02 + 08 00 + 09 00 | "
        'use one\'s feet to advance; advance by steps; "Walk, don\'t run!"  \n')
    expected["v:01904930"] = ("verb.motion", "use one's feet to advance; advance by steps", ["Walk, don't run!"])
    (folder / "data.adj").write_text(
        HEADER + "00001740 00 a 01 able 0 001 ! 00002098 a 0101 | (usually followed by `to') having the necessary means "
        'or skill; "able to swim"  \n'
        "00002312 44 s 01 abaxial 0 000 | facing away from the axis of an organ  \n")
    expected["a:00001740"] = ("adj.all", "(usually followed by `to') having the necessary means or skill", ["able to swim"])
    expected["a:00002312"] = ("adj.ppl", "facing away from the axis of an organ", [])
    (folder / "data.adv").write_text(HEADER + "00001740 02 r 01 barely 0 000 | only just  \n")
    expected["r:00001740"] = ("adv.all", "only just", [])
    return folder, expected, dict(test=test, leak=leak, shared=shared)


def read_rows(output):
    return {name: list(csv.DictReader(open(output / "task" / f"{name}.csv", encoding="utf-8")))
            for name in ("train", "validation", "test")}


def test_the_task_splits_share_no_synset_and_carry_the_files_labels(tmp_path, wordnet):
    folder, expected, planted = wordnet
    wordnet_data.main(["--wordnet_dir", str(folder), "--output_dir", str(tmp_path / "out")])
    rows = read_rows(tmp_path / "out")
    ids = {name: [r["synset"] for r in split] for name, split in rows.items()}
    assert all(len(v) == len(set(v)) for v in ids.values())
    assert not set(ids["train"]) & set(ids["test"]) and not set(ids["validation"]) & set(ids["test"])
    assert not set(ids["train"]) & set(ids["validation"])
    assert {f"n:{o:08d}" for o in planted["test"]} <= set(ids["test"]) and len(ids["test"]) >= 6
    # every synset is in one split, but the one whose definition is a test synset's
    shared = f"n:{planted['shared']:08d}"
    assert set().union(*ids.values()) == set(expected) - {shared}
    for split in rows.values():
        for row in split:
            label, definition, _ = expected[row["synset"]]
            assert (row["label"], row["text"]) == (label, definition)
    assert set(NAMES.values()) >= {row["label"] for split in rows.values() for row in split}
    assert all(wordnet_data.LEXNAMES[number] == name for number, name in NAMES.items())
    texts = [row["text"] for split in rows.values() for row in split]
    assert len(texts) == len(set(texts))  # no text in two splits
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["task"] == {name: len(split) for name, split in rows.items()}
    assert stats["shared_definitions_dropped"] == 1
    # rows are not in the files' order (grouped by label there) but in a hashed one, so that the first N
    # training rows are a random sample: within each split, the files' order is not kept
    file_order = list(expected)
    train = ids["train"]
    assert sorted(train, key=file_order.index) != train
    labels = [expected[i][0] for i in train]
    changes = sum(a != b for a, b in zip(labels, labels[1:]))
    assert changes > len(set(labels)) - 1  # grouped by label would change label only between groups


def test_the_corpus_is_free_of_the_test_texts(tmp_path, wordnet):
    folder, expected, planted = wordnet
    wordnet_data.main(["--wordnet_dir", str(folder), "--output_dir", str(tmp_path / "out")])
    rows = read_rows(tmp_path / "out")
    corpus = (tmp_path / "out" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    test_texts = [t for row in rows["test"] for t in [expected[row["synset"]][1], *expected[row["synset"]][2]]]
    for line in corpus:
        assert line not in test_texts
        assert not any(text in line for text in test_texts if len(text.split()) >= 4), line
    # what it holds: each other synset's words and definition, and its examples
    assert "walk, go on foot: use one's feet to advance; advance by steps" in corpus
    assert "Walk, don't run!" in corpus and "able to swim" in corpus
    for row in rows["train"] + rows["validation"]:
        _, definition, examples = expected[row["synset"]]
        assert any(line.endswith(": " + definition) for line in corpus), definition
        assert all(e in corpus for e in examples if expected[row["synset"]] != expected[f"n:{planted['leak']:08d}"])
    # the example that quotes a test definition is held back; the synset's definition line is kept
    assert "leaky: a leaky thing" in corpus
    assert not any("he said it was" in line for line in corpus)


def test_a_missing_wordnet_folder_says_how_to_install_it(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install wordnet-base"):
        wordnet_data.main(["--wordnet_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
