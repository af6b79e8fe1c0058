"""`slm chat`: two turns with the whole history, /reset, EOF, through a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from conftest import REPO, family_model
from simplified_slm.tokenizers import ByteTokenizer
from simplified_slm.tokenizers.chat_template import PLAIN_STOP, ChatTemplate

MAX_TOKENS = 6


def _expected_reply(model, tokenizer, history) -> str:
    """What the model says greedily to `history` rendered with the plain template."""
    ids = torch.tensor([tokenizer.encode_ids(ChatTemplate.for_tokenizer(tokenizer).render(history))])
    out = model.generate(ids, MAX_TOKENS, greedy=True)
    return tokenizer.decode(out[0, ids.shape[1]:]).split(PLAIN_STOP)[0]


def test_chat_keeps_the_history_and_resets(tmp_path):
    model, tokenizer = family_model("llama", seed=5), ByteTokenizer()
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-m", "simplified_slm.cli", "chat", "--model_path", str(tmp_path / "model"),
                             "--greedy", "--max_tokens", str(MAX_TOKENS), "--device", "cpu"],
                            input="hello\nhow are you\n/reset\nhello\n".encode(), capture_output=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    first = _expected_reply(model, tokenizer, [{"role": "user", "content": "hello"}])
    second = _expected_reply(model, tokenizer, [{"role": "user", "content": "hello"},
                                                {"role": "assistant", "content": first},
                                                {"role": "user", "content": "how are you"}])
    # after /reset the history is empty again, so "hello" gets the first answer again
    assert result.stdout.decode() == f">>> {first}\n>>> {second}\n>>> >>> {first}\n>>> "
    assert "(history cleared)" in result.stderr.decode() and "plain template" in result.stderr.decode()
