"""Multi-step arithmetic word problems with worked answers: an offline GSM8K in miniature.

Writes `train.jsonl` and `test.jsonl` (held out: no question appears in both) of
`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}` lines; every answer
works the problem step by step and ends "The answer is N." Deterministic for a seed.

    python scripts/make_arith_task.py --out data/arith --train 2000 --test 200 --seed 0

With a local GSM8K copy (`question` / `answer` lines ending "#### N"), the same command
converts it to the same shape instead (calculator notes `<<...>>` dropped, "#### N"
becoming "The answer is N."):

    python scripts/make_arith_task.py --out data/gsm8k --gsm8k-train train.jsonl --gsm8k-test test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Callable, Iterator

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Max", "Nora",
         "Omar", "Paul", "Rosa", "Sam", "Tara", "Umar", "Vera"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "coins", "books", "shells", "cards", "stamps"]
Problem = tuple[str, str]  # (question, worked answer)


def _buy_and_give(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, packs, each = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
    bought = packs * each
    give = rng.randint(1, start + bought - 1)
    end = start + bought - give
    question = (f"{name} has {start} {item}. {name} buys {packs} packs with {each} {item} in each pack, "
                f"then gives away {give} {item}. How many {item} does {name} have now?")
    answer = (f"{packs} packs of {each} {item} is {packs} * {each} = {bought} {item}. "
              f"{name} then has {start} + {bought} = {start + bought} {item}. "
              f"After giving away {give}, {name} has {start + bought} - {give} = {end} {item}. The answer is {end}.")
    return question, answer


def _share(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 9), rng.randint(2, 15), rng.randint(1, 20)
    total = friends * each + extra
    question = (f"{name} has {total} {item} and keeps {extra} of them. The rest are shared equally among "
                f"{friends} friends. How many {item} does each friend get?")
    answer = (f"{name} shares {total} - {extra} = {total - extra} {item}. "
              f"Each friend gets {total - extra} / {friends} = {each} {item}. The answer is {each}.")
    return question, answer


def _earn_and_spend(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    days, rate, cost, count = rng.randint(2, 7), rng.randint(3, 20), rng.randint(2, 9), rng.randint(1, 6)
    earned, spent = days * rate, cost * count
    if spent > earned:
        count = max(1, earned // cost)
        spent = cost * count
    question = (f"{name} earns {rate} dollars a day for {days} days, then buys {count} toys that cost {cost} "
                f"dollars each. How many dollars does {name} have left?")
    answer = (f"{name} earns {days} * {rate} = {earned} dollars. The toys cost {count} * {cost} = {spent} dollars. "
              f"{name} has {earned} - {spent} = {earned - spent} dollars left. The answer is {earned - spent}.")
    return question, answer


def _two_groups(rng: random.Random) -> Problem:
    item = rng.choice(ITEMS)
    a, b = rng.sample(NAMES, 2)
    first, more, times = rng.randint(3, 25), rng.randint(1, 15), rng.randint(2, 4)
    second = first + more
    third = second * times
    total = first + second + third
    question = (f"{a} has {first} {item}. {b} has {more} more {item} than {a}. A box holds {times} times as many "
                f"{item} as {b} has. How many {item} are there altogether?")
    answer = (f"{b} has {first} + {more} = {second} {item}. The box holds {times} * {second} = {third} {item}. "
              f"Altogether there are {first} + {second} + {third} = {total} {item}. The answer is {total}.")
    return question, answer


KINDS: list[Callable[[random.Random], Problem]] = [_buy_and_give, _share, _earn_and_spend, _two_groups]


def problems(seed: int) -> Iterator[Problem]:
    """An endless, seed-determined stream of distinct problems."""
    rng, seen = random.Random(seed), set()
    while True:
        question, answer = rng.choice(KINDS)(rng)
        if question not in seen:
            seen.add(question)
            yield question, answer


def record(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def from_gsm8k(path: Path) -> list[dict]:
    """GSM8K lines as our records: calculator notes dropped, "#### N" -> "The answer is N."."""
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "question" not in row or "answer" not in row or "####" not in row["answer"]:
            sys.exit(f"error: {path}:{number} is not a GSM8K line (question, answer ending '#### N')")
        work, final = row["answer"].rsplit("####", 1)
        work = re.sub(r"<<[^>]*>>", "", work).strip()
        out.append(record(row["question"], f"{work}\nThe answer is {final.strip()}."))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for train.jsonl and test.jsonl")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--test", type=int, default=200, help="held-out problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gsm8k-train", type=Path, help="convert this GSM8K JSONL instead of generating")
    parser.add_argument("--gsm8k-test", type=Path, help="the GSM8K held-out JSONL to convert")
    args = parser.parse_args(argv)
    if (args.gsm8k_train is None) != (args.gsm8k_test is None):
        parser.error("--gsm8k-train and --gsm8k-test go together")
    if args.gsm8k_train is not None:
        train, test = from_gsm8k(args.gsm8k_train), from_gsm8k(args.gsm8k_test)
    else:
        if args.train < 1 or args.test < 1:
            parser.error("--train and --test must be at least 1")
        stream = problems(args.seed)
        rows = [record(*next(stream)) for _ in range(args.train + args.test)]
        train, test = rows[:args.train], rows[args.train:]  # distinct questions, so disjoint
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} training and {len(test)} held-out problems to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
