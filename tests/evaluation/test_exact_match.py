"""Exact match: the final-answer extractor and the batched greedy scoring."""

from __future__ import annotations

import pytest
import torch

from conftest import family_model
from simplified_slm.data.chat import encode_conversation
from simplified_slm.evaluation.exact_match import answer_losses, answers_match, exact_match, extract_answer
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.tokenizers.chat_template import ChatTemplate


@pytest.mark.parametrize("text, answer", [
    ("5 * 3 = 15, so 12 + 15 = 27. The answer is 27.", "27"),
    ("Natalia sold 48/2 = 24 clips.\n#### 1,072", "1072"),
    ("The answer is: $-4.50", "-4.5"),
    ("first 3 then 7.0", "7"),
    ("the answer is 12 apples, not 13", "12"),
    ("  no digits here ", "no digits here"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_answers_match_compares_final_answers_only():
    assert answers_match("so 2 + 2 = 4. The answer is 4.", "#### 4")
    assert not answers_match("The answer is 5.", "The answer is 4.")


def test_exact_match_scores_the_greedy_replies_batched_as_alone():
    tokenizer = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tokenizer)
    model = family_model("llama")
    prompts = ["What is 2 plus 2?", "Hi", "A much longer question, to make the batch ragged?"]
    examples = [encode_conversation([{"role": "user", "content": p}, {"role": "assistant", "content": "1"}],
                                    template, tokenizer) for p in prompts]
    solo = []
    for example in examples:  # each prompt alone, greedy, cut at the plain template's stop string
        ids = torch.tensor([tokenizer.encode_ids(template.render(example.prompt))])
        out = model.generate(ids, 12, greedy=True)
        solo.append(tokenizer.decode(out[0, ids.shape[1]:]).split("\nUser:")[0])
    scored = exact_match(model, tokenizer, template, examples, max_new_tokens=12, batch_size=2)
    assert scored.replies == solo
    for example, reply in zip(examples, solo):  # make the references what the model says (or not)
        example.reference = reply if reply.strip() else "x"
    again = exact_match(model, tokenizer, template, examples, max_new_tokens=12)
    assert again.correct == [bool(r.strip()) for r in solo]
    examples[0].reference = "#### 123456789"
    assert exact_match(model, tokenizer, template, examples[:1], max_new_tokens=12).accuracy == 0.0


def test_answer_losses_are_per_example():
    tokenizer = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tokenizer)
    model = family_model("gpt")
    examples = [encode_conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                    template, tokenizer) for q, a in (("q", "short"), ("longer q", "a reply"))]
    together = answer_losses(model, examples, block_size=60)
    alone = [answer_losses(model, [e], block_size=60)[0] for e in examples]
    assert together == pytest.approx(alone, rel=1e-5)
