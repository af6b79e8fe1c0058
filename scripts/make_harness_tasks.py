"""Build the offline lm-evaluation-harness tasks shipped in `simplified_slm/harness_tasks/`.

    python scripts/make_harness_tasks.py [--out src/simplified_slm/harness_tasks]

Deterministic (fixed seed, no network): rerunning it rewrites the same JSONL bytes, which
are committed next to the task YAMLs. Source: the bundled TinyStories validation slice
(`corpora/tinystories_valid.txt.gz`, lowercased, paragraphs separated by blank lines).

Stories: the slice has no story separator, so a story is a paragraph that begins with
"once upon a time" plus the paragraphs up to the next such one (the text before the first
one, a cut-off story, is dropped). Sentences: split after . ! or ? (optionally followed by
a closing quote) and whitespace.

- tinystories_cloze.jsonl: one item per story with at least 4 sentences (the first
  CLOZE_ITEMS stories): context = its first k sentences (k drawn in 2..min(6, n-1)), the
  true next sentence among 4 choices; the 3 distractors are sentences of other stories;
  the gold position is drawn too. Fields: context, choices, label.
- tinystories_ppl.jsonl: the first PPL_STORIES whole stories, paragraphs kept. Field: text.
- arith.jsonl: ARITH_ITEMS arithmetic word problems from `make_arith_task.problems(ARITH_SEED)`
  (this folder's script), those right after its first ARITH_TRAIN: the start of the held-out
  split of `make_arith_task.py --seed 0 --train 2000`, so disjoint from its train.jsonl.
  Fields: question, answer (worked, ends "The answer is N."), target (N).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

from make_arith_task import problems  # scripts/ is on sys.path when this script runs

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "src/simplified_slm/corpora/tinystories_valid.txt.gz"
SEED = 1234
CLOZE_ITEMS = 200
PPL_STORIES = 100
ARITH_SEED, ARITH_TRAIN, ARITH_ITEMS = 0, 2000, 50
_FINAL_ANSWER = re.compile(r"The answer is (-?[0-9][0-9,]*)\.$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'])\s+")


def stories(text: str) -> list[str]:
    """Whole stories of the slice, each its paragraphs joined by blank lines."""
    found: list[list[str]] = []
    for paragraph in (p.strip() for p in text.split("\n\n")):
        if paragraph.startswith("once upon a time"):
            found.append([paragraph])
        elif found and paragraph:
            found[-1].append(paragraph)
    return ["\n\n".join(parts) for parts in found]


def sentences(story: str) -> list[str]:
    """The story's sentences, paragraph breaks flattened to spaces."""
    flat = " ".join(story.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


def cloze_items(all_stories: list[str], rng: random.Random) -> list[dict]:
    split = [sentences(s) for s in all_stories]
    items = []
    for index, sents in enumerate(split):
        if len(items) == CLOZE_ITEMS:
            break
        if len(sents) < 4:
            continue
        k = rng.randint(2, min(6, len(sents) - 1))
        distractors = []
        while len(distractors) < 3:
            other = rng.randrange(len(split))
            # not a story's first sentence: "once upon a time ..." would give itself away
            candidate = rng.choice(split[other][1:]) if len(split[other]) > 1 else ""
            if other != index and candidate and candidate != sents[k] and candidate not in distractors:
                distractors.append(candidate)
        label = rng.randrange(4)
        choices = distractors[:label] + [sents[k]] + distractors[label:]
        items.append({"context": " ".join(sents[:k]), "choices": choices, "label": label})
    return items


def arith_items() -> list[dict]:
    """The held-out arithmetic problems with their final number as the exact-match target."""
    stream = problems(ARITH_SEED)
    for _ in range(ARITH_TRAIN):
        next(stream)
    items = []
    for _ in range(ARITH_ITEMS):
        question, answer = next(stream)
        items.append({"question": question, "answer": answer, "target": _FINAL_ANSWER.search(answer).group(1)})
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "src/simplified_slm/harness_tasks"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    all_stories = stories(gzip.open(SOURCE, "rt", encoding="utf-8").read())
    cloze = cloze_items(all_stories, random.Random(SEED))
    write_jsonl(out / "tinystories_cloze.jsonl", cloze)
    write_jsonl(out / "tinystories_ppl.jsonl", [{"text": s} for s in all_stories[:PPL_STORIES]])
    write_jsonl(out / "arith.jsonl", arith_items())
    print(f"{len(all_stories)} stories -> {len(cloze)} cloze items, {PPL_STORIES} perplexity stories, "
          f"{ARITH_ITEMS} arithmetic problems in {out}")


if __name__ == "__main__":
    main()
