"""Build a pretraining corpus and a labelled fine-tuning task from WordNet 3.0, offline.

Reads the database files of Debian's ``wordnet-base`` package (Princeton WordNet 3.0, under its
permissive license; install it with ``apt-get install wordnet-base``), by default from
``/usr/share/wordnet``: ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv``, one synset per
line in the format of wndb(5WN):

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] [frames ...] | gloss

and writes, into ``--output_dir``:

- ``task/train.csv``, ``task/validation.csv``, ``task/test.csv``: the fine-tuning task, one synset
  per row, columns ``text`` (the synset's definition: its gloss without the quoted examples),
  ``label`` (its lexicographer file, one of the 45 of lexnames(5WN), e.g. ``noun.animal``,
  ``verb.motion``) and ``synset`` (``pos:offset``, e.g. ``n:02084071``). Each synset falls into
  one split by a hash of its id (80% / 10% / 10%), so the splits are fixed and share no synset.
  A definition that is the text of several synsets keeps only its rows in the earliest split of
  test, validation and train, so that no text is in two splits. Rows are in an order fixed by
  another part of the same hash, not grouped by label, so the first N rows are a random sample.
- ``corpus.txt``: the pretraining corpus, one line per text: for every synset outside the test
  split, ``word, word: definition`` and each quoted example sentence. No line of it is the
  definition or an example of a test synset, or contains one of four words or more (`TextIndex`).
- ``stats.json``: the counts of each, by split and label.

The labels come from the files themselves (field 2), so predicting them from the definition is a
real text classification task: 45 classes, about 117,000 synsets.

    python examples/pretrain/wordnet_data.py --output_dir data/wordnet
    python examples/glue/run_glue.py --train_file data/wordnet/task/train.csv \
        --validation_file data/wordnet/task/validation.csv --text_column_names text ...
"""

import argparse
import csv
import hashlib
import json
import os
import sys
from collections import Counter

#: lexnames(5WN): the lexicographer files, by their number in field 2 of a data line.
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
#: The splits, in the order a shared definition is given to (the earliest wins), with their shares.
SPLITS = (("test", 0.1), ("validation", 0.1), ("train", 0.8))
INSTALL = "install Debian's WordNet 3.0 database with `apt-get install wordnet-base` (it goes to /usr/share/wordnet)"


def parse_line(line: str) -> dict:
    """One synset from a data line: its id, words, label, definition and examples."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    words = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
    pos = "a" if ss_type == "s" else ss_type  # (adjective satellites are adjectives)
    definition, examples = split_gloss(gloss.strip())
    return {"synset": f"{pos}:{offset}", "label": LEXNAMES[lex_filenum], "words": words,
            "definition": definition, "examples": examples}


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """A gloss is a definition, then example sentences in double quotes, separated by "; "
    (``a member of the genus Canis ...; "the dog barked all night"``)."""
    quote = gloss.find('"')
    if quote < 0:
        return gloss.rstrip("; ").strip(), []
    definition = gloss[:quote].rstrip("; ").strip()
    examples = [part.strip() for part in gloss[quote:].split('"')[1::2] if part.strip()]
    return definition, examples


def read_synsets(wordnet_dir: str) -> list[dict]:
    """Every synset of the four data files (their license header lines begin with spaces)."""
    missing = [name for name in FILES if not os.path.isfile(os.path.join(wordnet_dir, name))]
    if missing:
        raise SystemExit(f"--wordnet_dir {wordnet_dir!r} has no {', '.join(missing)}: {INSTALL}, or point "
                         "--wordnet_dir at a folder with WordNet 3.0's data.noun, data.verb, data.adj and data.adv")
    synsets = []
    for name in FILES:
        with open(os.path.join(wordnet_dir, name), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.startswith(" ") or not line.strip():
                    continue
                try:
                    synsets.append(parse_line(line.rstrip("\n")))
                except (IndexError, ValueError) as error:
                    raise SystemExit(f"{name}, line {number}: not a WordNet data line ({error}): {line[:80]!r}")
    return synsets


def position(synset: str) -> float:
    """A synset's place in [0, 1), from a hash of its id: it fixes the split and the order of rows."""
    return int.from_bytes(hashlib.sha256(f"hf_flat.wordnet/{synset}".encode()).digest()[:8], "big") / 2**64


def split_of(synset: str) -> str:
    """The split of a synset: fixed by a hash of its id."""
    u = position(synset)
    for name, share in SPLITS:
        if u < share:
            return name
        u -= share
    return SPLITS[-1][0]


def build(wordnet_dir: str, output_dir: str) -> dict:
    synsets = [s for s in read_synsets(wordnet_dir) if s["definition"]]
    for s in synsets:
        s["split"] = split_of(s["synset"])
    # a definition shared by several synsets stays in the earliest split only
    first = {}
    order = [name for name, _ in SPLITS]
    for s in synsets:
        rank = order.index(s["split"])
        first[s["definition"]] = min(rank, first.get(s["definition"], rank))
    rows = {name: [] for name in order}
    dropped = 0
    for s in synsets:
        if order.index(s["split"]) == first[s["definition"]]:
            rows[s["split"]].append(s)
        else:
            dropped += 1
    os.makedirs(os.path.join(output_dir, "task"), exist_ok=True)
    for name, items in rows.items():
        # rows in hash order, not in the files' order (which groups them by label), so that the first N
        # rows (`--max_train_samples N`) are a random sample of the task
        items = sorted(items, key=lambda s: (position(s["synset"]) * 1e6) % 1)
        with open(os.path.join(output_dir, "task", f"{name}.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "synset"])
            writer.writerows([s["definition"], s["label"], s["synset"]] for s in items)
    # the corpus: every text of the synsets outside the test split, none that holds a test text
    test_texts = TextIndex(t for s in synsets if s["split"] == "test" for t in [s["definition"], *s["examples"]])
    lines, held_back = [], 0
    for s in synsets:
        if s["split"] == "test":
            continue
        for text in [f"{', '.join(s['words'])}: {s['definition']}", *s["examples"]]:
            if test_texts.found_in(text):
                held_back += 1
            else:
                lines.append(text)
    with open(os.path.join(output_dir, "corpus.txt"), "w", encoding="utf-8") as f:
        f.writelines(line.replace("\n", " ") + "\n" for line in lines)
    stats = {
        "wordnet_dir": os.path.abspath(wordnet_dir),
        "synsets": len(synsets),
        "task": {name: len(items) for name, items in rows.items()},
        "labels": {name: dict(sorted(Counter(s["label"] for s in items).items())) for name, items in rows.items()},
        "shared_definitions_dropped": dropped,
        "corpus_lines": len(lines),
        "corpus_lines_held_back_for_holding_a_test_text": held_back,
        "corpus_words": sum(len(line.split()) for line in lines),
    }
    with open(os.path.join(output_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    return stats


class TextIndex:
    """A set of texts, to find the lines that hold one: a line holds a text it equals, or one of at
    least `MIN_WORDS` words that it contains from the start of one of its words (shorter texts, such
    as "a dog", would knock out lines that merely use the phrase)."""

    MIN_WORDS = 4

    def __init__(self, texts):
        self.whole, self.by_first_word = set(), {}
        for text in texts:
            self.whole.add(text)
            words = text.split()
            if len(words) >= self.MIN_WORDS:
                self.by_first_word.setdefault(words[0], []).append(text)

    def found_in(self, line: str) -> bool:
        if line in self.whole:
            return True
        return any(text in line for word in set(line.split()) for text in self.by_first_word.get(word, ()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet_dir", default="/usr/share/wordnet",
                        help="the folder of WordNet 3.0's data.noun / data.verb / data.adj / data.adv")
    parser.add_argument("--output_dir", required=True, help="where task/*.csv, corpus.txt and stats.json go")
    args = parser.parse_args(argv)
    stats = build(args.wordnet_dir, args.output_dir)
    print(json.dumps({k: v for k, v in stats.items() if k != "labels"}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
