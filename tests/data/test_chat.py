"""Chat SFT data: the accepted shapes, answer-only labels, padding without leakage, loss falling."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILY_CONFIGS, family_model
from simplified_slm.data.chat import (
    IGNORE,
    ChatBatchSampler,
    conversation,
    encode_conversation,
    pad_examples,
    read_conversations,
)
from simplified_slm.errors import SLMError
from simplified_slm.models.base import next_token_loss
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.tokenizers.chat_template import ChatTemplate
from simplified_slm.training.config import ExperimentConfig
from simplified_slm.training.trainer import Trainer

TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
             {"role": "assistant", "content": "5"}, {"role": "user", "content": "and 4+4?"},
             {"role": "assistant", "content": "8"}]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reader_takes_messages_prompt_completion_and_gsm8k(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"messages": TWO_TURNS}, {"prompt": "p", "completion": "c"},
                                         {"question": "q", "answer": "a\n#### 3"},
                                         {"id": 4, "messages": TWO_TURNS[:4], "completion": "8"}])  # a trace
    convs = read_conversations(path)
    assert convs[3] == TWO_TURNS
    assert convs[0] == TWO_TURNS
    assert convs[1] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert convs[2][1]["content"] == "a\n#### 3"
    with pytest.raises(SLMError, match=r"c.jsonl:2: .*no assistant reply"):
        read_conversations(_write(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"},
                                                         {"messages": [{"role": "user", "content": "x"}]}]))
    with pytest.raises(SLMError, match="role"):
        conversation({"messages": [{"role": "robot", "content": "x"}]}, "here")
    assert len(read_conversations(tmp_path / "c.jsonl", on_error="skip")) == 1


def test_labels_are_the_replies_only():
    tokenizer = ByteTokenizer()
    example = encode_conversation(TWO_TURNS, ChatTemplate.for_tokenizer(tokenizer), tokenizer)
    text = tokenizer.decode(example.ids)
    assert text == "System: Be brief.\nUser: 2+3?\nAssistant: 5\nUser: and 4+4?\nAssistant: 8\n"
    trained = [chr(i) if label != IGNORE else "_" for i, label in zip(example.ids, example.labels)]
    # both replies (with the newline that ends the turn) and nothing else
    assert [t for t in "".join(trained).split("_") if t] == [" 5\n", " 8\n"]
    assert example.prompt == TWO_TURNS[:4] and example.reference == "8"


def test_prompt_tokens_get_no_gradient():
    tokenizer = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tokenizer)
    examples = [encode_conversation(TWO_TURNS, template, tokenizer),
                encode_conversation([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
                                    template, tokenizer)]
    x, y = pad_examples(examples, block_size=128)
    model = family_model("llama").train()
    logits = model(x).logits.detach().requires_grad_(True)
    next_token_loss(logits, y).backward()
    per_position = logits.grad.abs().sum(-1)
    assert torch.all(per_position[y == IGNORE] == 0)  # prompt and padding: exactly zero
    assert torch.all(per_position[y != IGNORE] > 0)
    # whatever the model predicts at prompt and pad positions, the loss is the same
    noisy = logits.detach().clone()
    noisy[y == IGNORE] += 10 * torch.randn_like(noisy[y == IGNORE])
    assert next_token_loss(noisy, y) == next_token_loss(logits.detach(), y)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_padded_batch_rows_equal_their_solo_runs(family):
    """Right padding: no example sees another, or the padding after it."""
    tokenizer = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tokenizer)
    convs = [TWO_TURNS, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             [{"role": "user", "content": "a longer question here?"}, {"role": "assistant", "content": "ok"}]]
    examples = [encode_conversation(c, template, tokenizer) for c in convs]
    model = family_model(family)
    x, _ = pad_examples(examples, block_size=60)  # gpt: a 64-token context
    with torch.no_grad():
        batched = model(x).logits
        for row, example in enumerate(examples):
            solo_x, _ = pad_examples([example], block_size=60)
            solo = model(solo_x).logits[0]
            torch.testing.assert_close(batched[row, :len(solo)], solo, atol=1e-5, rtol=1e-5)


def test_sampler_batches_are_a_function_of_the_step():
    tokenizer = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tokenizer)
    examples = [encode_conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}],
                                    template, tokenizer) for i in range(1, 9)]
    a, b = ChatBatchSampler(examples, 64, 4, seed=3), ChatBatchSampler(examples, 64, 4, seed=3)
    for step in (0, 5, 2):
        assert all(torch.equal(u, v) for u, v in zip(a.batch(step), b.batch(step)))
    x, y = a.batch(1)
    assert x.shape[0] == 4 and x.shape[1] <= 64
    seq = ChatBatchSampler(examples, 64, 3, seed=0, mode="sequential")
    assert torch.equal(seq.batch(0)[0], pad_examples(examples[:3], 64)[0])
    assert torch.equal(seq.batch(3)[0], pad_examples(examples[1:4], 64)[0])  # 9, 10, 11 wrap to 1, 2, 3


def test_chat_sft_loss_falls(tmp_path):
    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a} + {b} = {a + b}. The answer is {a + b}."}
            for a in range(1, 13) for b in range(1, 13)]
    train = _write(tmp_path / "train.jsonl", rows[:130])
    val = _write(tmp_path / "val.jsonl", rows[130:])
    cfg = ExperimentConfig.from_dict({
        "seed": 0, "output_dir": str(tmp_path / "run"), "model": {**FAMILY_CONFIGS["llama"]},
        "data": {"format": "chat", "train_file": str(train), "val_file": str(val)},
        "train": {"max_steps": 50, "batch_size": 16, "block_size": 80, "lr": 5e-3, "min_lr": 5e-4,
                  "warmup_steps": 5, "eval_every": 50, "sample_every": 1000, "sample_tokens": 4,
                  "checkpoint_every": 1000, "log_every": 10, "progress": False, "loggers": ["csv"],
                  "eval_exact_match": 4}})
    trainer = Trainer(cfg)
    state = trainer.setup()
    state.phase = trainer.phases[0]
    before = trainer.validate(state)["loss"]
    result = trainer.fit(state)
    after = result.val_metrics
    assert after["loss"] < 0.5 * before, (before, after)
    assert after["examples"] == len(rows) - 130 and 0.0 <= after["exact_match"] <= 1.0


def _arith_task():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("make_arith_task", REPO / "scripts" / "make_arith_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arith_task_is_deterministic_held_out_and_correct(tmp_path):
    import re

    from simplified_slm.evaluation.exact_match import extract_answer

    task = _arith_task()
    task.main(["--out", str(tmp_path / "a"), "--train", "200", "--test", "50", "--seed", "4"])
    task.main(["--out", str(tmp_path / "b"), "--train", "200", "--test", "50", "--seed", "4"])
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    train, test = (read_conversations(tmp_path / "a" / f"{s}.jsonl") for s in ("train", "test"))
    assert len(train) == 200 and len(test) == 50
    assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in test}
    for conv in train + test:
        answer = conv[1]["content"]
        steps = re.findall(r"(\d+) ([-+*/]) (\d+)(?: [-+] (\d+))? = (\d+)", answer)
        assert steps and answer.endswith(f"The answer is {extract_answer(answer)}.")
        for a, op, b, c, result in steps:  # every worked step is right
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op]
            assert value + (int(c) if c else 0) == int(result), answer
        assert int(steps[-1][-1]) == int(extract_answer(answer))


def test_arith_task_converts_gsm8k(tmp_path):
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"}]
    _write(tmp_path / "gsm_train.jsonl", rows)
    _write(tmp_path / "gsm_test.jsonl", rows)
    _arith_task().main(["--out", str(tmp_path / "out"), "--gsm8k-train", str(tmp_path / "gsm_train.jsonl"),
                        "--gsm8k-test", str(tmp_path / "gsm_test.jsonl")])
    [conv] = read_conversations(tmp_path / "out" / "test.jsonl")
    assert conv[1]["content"] == "In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72.\nThe answer is 72."
    assert read_conversations(tmp_path / "gsm_train.jsonl")[0][1]["content"].endswith("#### 72")  # read as is too
