"""Tokenizer contracts: exact round trips, the seed APIs, byte accounting, persistence, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers

from simplified_slm.errors import SLMError
from simplified_slm.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    TokenizerConfig,
    build_tokenizer,
    load_tokenizer,
)
from simplified_slm.tokenizers.char import UNK_TEXT, normalize_ascii

CORPORA = Path(__file__).resolve().parents[2] / "src" / "simplified_slm" / "corpora"
PROPERTY = settings(max_examples=200, deadline=None)


def read_corpus(name: str, limit: int | None = None) -> str:
    with gzip.open(CORPORA / name, "rt", encoding="utf-8") as fh:
        return fh.read(limit) if limit else fh.read()


def assert_reloads_identically(tokenizer: Tokenizer, directory: Path, text: str) -> Tokenizer:
    tokenizer.save(directory)
    loaded = load_tokenizer(directory)
    assert type(loaded) is type(tokenizer)
    assert loaded.spec() == tokenizer.spec()
    assert loaded.encode_ids(text) == tokenizer.encode_ids(text)
    np.testing.assert_array_equal(loaded.token_byte_lengths(), tokenizer.token_byte_lengths())
    return loaded


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(read_corpus("tinystories_train.txt.gz", 300_000).splitlines(), vocab_size=512)


# --- byte ---------------------------------------------------------------------------------

def test_seed_000_snippet() -> None:
    from simplified_slm.utils import ByteTokenizer as SeedByteTokenizer

    tokenizer = SeedByteTokenizer()
    encoded = tokenizer.encode(["Hello world"])[0]["input_ids"]
    assert isinstance(encoded, np.ndarray) and encoded.dtype == np.int64
    input_ids = torch.tensor([encoded.tolist()])
    assert tokenizer.decode(input_ids[0].tolist()) == "Hello world"
    assert tokenizer.decode(input_ids[0]) == tokenizer.decode(encoded) == "Hello world"


def test_byte_round_trip_emoji_and_invalid_utf8() -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.encode_ids("h\u00e9\U0001f600") == list("h\u00e9\U0001f600".encode())
    assert tokenizer.decode(tokenizer.encode_ids("h\u00e9\U0001f600")) == "h\u00e9\U0001f600"
    raw = b"ok \xff\xfe \xf0\x9f\x98"  # invalid bytes and an emoji cut in half
    assert tokenizer.decode_bytes(tokenizer.encode_ids(raw)) == raw
    assert tokenizer.decode(tokenizer.encode_ids(raw)) == raw.decode("utf-8", errors="replace")
    assert tokenizer.vocab_size == 256 and tokenizer.special_ids() == {}
    np.testing.assert_array_equal(tokenizer.token_byte_lengths(), np.ones(256))


def test_byte_rejects_ids_outside_vocab() -> None:
    with pytest.raises(SLMError, match="token id 256"):
        ByteTokenizer().decode([72, 256])


@PROPERTY
@given(st.binary())
def test_byte_lossless_on_any_bytes(data: bytes) -> None:
    tokenizer = ByteTokenizer()
    assert tokenizer.decode_bytes(tokenizer.encode_ids(data)) == data


def test_byte_save_load(tmp_path: Path) -> None:
    assert_reloads_identically(ByteTokenizer(), tmp_path / "tok", "caf\u00e9")


# --- char ---------------------------------------------------------------------------------

def test_char_ascii_policy_ids() -> None:
    tokenizer = CharTokenizer()
    assert tokenizer.vocab_size == 2 + 95 + 2
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id) == (0, 1)
    assert tokenizer.encode_ids(" A~\n\t") == [2, 2 + 65 - 32, 2 + 126 - 32, 97, 98]
    assert tokenizer.encode_ids("\u4e2d") == [1]
    assert tokenizer.decode([0, 35, 1, 0]) == "A" + UNK_TEXT
    np.testing.assert_array_equal(tokenizer.token_byte_lengths(), [0] + [1] * 98)


def test_unknown_char_ids_decode_to_nothing() -> None:
    # a sample with <UNK> reads as text: no U+FFFD marks, no "?" that could be a real one
    tokenizer = CharTokenizer()
    assert tokenizer.decode([35, 1, 36, 1]) == "AB"
    assert tokenizer.decode(tokenizer.encode_ids("caf中e")) == "cafe"
    assert tokenizer.normalize("caf中e") == "cafe"


def test_normalize_ascii_folds_typography() -> None:
    text = "\u2018a\u2019 \u201cb\u201d 1\u20132 x\u2014y wait\u2026\u00a0caf\u00e9\r\nend\rnow\ufeff"
    assert normalize_ascii(text) == "'a' \"b\" 1-2 x--y wait... cafe\nend\nnow"
    assert normalize_ascii("\u00b4") == "'"  # a spacing accent is not a space
    tokenizer = CharTokenizer()
    assert tokenizer.decode(tokenizer.encode_ids("\u201cHi\u201d \u4e2d")) == '"Hi" ' + UNK_TEXT


@PROPERTY
@given(st.text())
def test_char_decode_of_encode_is_normalize(text: str) -> None:
    tokenizer = CharTokenizer()
    normalized = tokenizer.normalize(text)
    assert tokenizer.decode(tokenizer.encode_ids(text)) == normalized
    assert tokenizer.normalize(normalized) == normalized
    ids = tokenizer.encode_ids(text)  # one id per folded character; <UNK> decodes to nothing
    assert len(ids) == len(normalized) + ids.count(tokenizer.unk_token_id)


def test_char_from_corpus_tiny_shakespeare(tmp_path: Path) -> None:
    text = read_corpus("tinyshakespeare.txt.gz")
    tokenizer = CharTokenizer.from_corpus([text])
    assert tokenizer.vocab_size == 65 + 2
    ids = tokenizer.encode_ids(text)
    assert tokenizer.decode(ids) == text
    assert 1 not in ids
    loaded = assert_reloads_identically(tokenizer, tmp_path / "tok", text[:2000])
    assert loaded.normalize("\u201c") == UNK_TEXT  # corpus policy does not fold to ASCII


def test_char_corpus_byte_lengths_and_bytes_input() -> None:
    tokenizer = CharTokenizer.from_corpus(["ab\u00e9"])
    np.testing.assert_array_equal(tokenizer.token_byte_lengths(), [0, 1, 1, 1, 2])
    assert tokenizer.decode(tokenizer.encode_ids("ab\u00e9".encode())) == "ab\u00e9"


def test_char_missing_vocab_file_is_named(tmp_path: Path) -> None:
    CharTokenizer().save(tmp_path)
    (tmp_path / "vocab.json").unlink()
    with pytest.raises(SLMError, match="vocab.json"):
        load_tokenizer(tmp_path)


# --- bpe ----------------------------------------------------------------------------------

def test_bpe_round_trip_compression_and_byte_accounting(bpe: BPETokenizer) -> None:
    text = read_corpus("tinystories_valid.txt.gz", 50_000)
    ids = bpe.encode_ids(text)
    assert bpe.decode(ids) == text
    assert bpe.encode_batch(text.splitlines()[:50]) == [bpe.encode_ids(line) for line in text.splitlines()[:50]]
    assert len(text.encode()) / len(ids) > 2
    assert int(bpe.token_byte_lengths()[ids].sum()) == len(text.encode())
    assert bpe.vocab_size == 512
    assert (bpe.eos_token_id, bpe.pad_token_id) == (0, 1)
    assert bpe.token_byte_lengths()[[0, 1]].tolist() == [0, 0]


def test_bpe_keeps_special_tokens_in_text(bpe: BPETokenizer) -> None:
    text = "the end<|endoftext|>once"
    assert bpe.eos_token_id in bpe.encode_ids(text)
    assert bpe.decode(bpe.encode_ids(text)) == text


@PROPERTY
@given(st.text())
def test_bpe_lossless_on_any_text(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode_ids(text)
    assert bpe.decode(ids) == text
    assert int(bpe.token_byte_lengths()[ids].sum()) == len(text.encode())


def test_bpe_save_load_and_bare_tokenizer_json(bpe: BPETokenizer, tmp_path: Path) -> None:
    text = read_corpus("tinystories_valid.txt.gz", 5_000)
    assert_reloads_identically(bpe, tmp_path / "saved", text)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tmp_path / "saved" / "tokenizer.json").read_bytes())
    for source in (bare / "tokenizer.json", bare):
        loaded = load_tokenizer(source)
        assert isinstance(loaded, BPETokenizer)
        assert loaded.encode_ids(text) == bpe.encode_ids(text)
        assert loaded.special_ids() == bpe.special_ids()


def test_bpe_rejects_tiny_vocab_and_bad_ids(bpe: BPETokenizer) -> None:
    with pytest.raises(SLMError, match="at least 306"):
        BPETokenizer.train(["hello"], vocab_size=300, special_tokens=[f"<s{i}>" for i in range(50)])
    with pytest.raises(SLMError, match="token id 512"):
        bpe.decode([3, 512])


def sentencepiece_style(directory: Path) -> Path:
    """A tiny Llama-2 style tokenizer.json: Metaspace spaces, <0xNN> byte fallback, Strip decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "\u2581": 259, "a": 260, "b": 261, "\u2581a": 262, "\u2581ab": 263}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("\u2581", "a"), ("\u2581a", "b")],
                                byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    directory.mkdir()
    hf.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_sentencepiece_style_file(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(sentencepiece_style(tmp_path / "llama2"))
    assert tokenizer.special_ids() == {"unk_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    ids = tokenizer.encode_ids("ab \u00e9")
    assert tokenizer.decode(ids) == "ab \u00e9"
    lengths = tokenizer.token_byte_lengths()
    assert lengths[[0, 1, 2, 3 + 0xC3, 259, 263]].tolist() == [0, 0, 0, 1, 1, 3]
    # The prepended "\u2581" is counted although the decoder strips it again.
    assert int(lengths[ids].sum()) == len("ab \u00e9".encode()) + 1


def test_hf_tokenizer_config_overrides_specials(tmp_path: Path) -> None:
    path = sentencepiece_style(tmp_path / "llama2")
    config = {"eos_token": {"content": "<s>", "special": True}, "pad_token": "<unk>", "bos_token": None}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = BPETokenizer.from_file(path)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (1, 0, 1)
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(SLMError, match="eos_token '<|nope|>'"):
        load_tokenizer(path.parent)


# --- config, factory, loading errors --------------------------------------------------------

def test_tokenizer_config_validation() -> None:
    with pytest.raises(SLMError, match="TokenizerConfig.kind"):
        TokenizerConfig(kind="wordpiece")
    with pytest.raises(SLMError, match="TokenizerConfig.vocab_size"):
        TokenizerConfig(kind="bpe")
    with pytest.raises(SLMError, match="TokenizerConfig.vocab_size"):
        TokenizerConfig(kind="bpe", vocab_size=100)
    with pytest.raises(SLMError, match="TokenizerConfig.path"):
        TokenizerConfig(kind="file")
    with pytest.raises(SLMError, match="TokenizerConfig.char_policy"):
        TokenizerConfig.from_dict({"kind": "char", "char_policy": "latin1"})


def test_build_tokenizer_each_kind(bpe: BPETokenizer, tmp_path: Path) -> None:
    texts = ["hello there", "general kenobi"]
    assert isinstance(build_tokenizer(TokenizerConfig()), ByteTokenizer)
    assert build_tokenizer(TokenizerConfig(kind="char")).vocab_size == 99
    assert build_tokenizer(TokenizerConfig(kind="char", char_policy="corpus"), lambda: texts).vocab_size == 2 + 13
    trained = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), lambda: texts)
    assert trained.decode(trained.encode_ids("hello kenobi")) == "hello kenobi"
    bpe.save(tmp_path)
    loaded = build_tokenizer(TokenizerConfig(kind="file", path=str(tmp_path / "tokenizer.json")))
    assert loaded.encode_ids("once upon") == bpe.encode_ids("once upon")
    with pytest.raises(SLMError, match="texts="):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SLMError, match="missing_tok"):
        load_tokenizer(tmp_path / "missing_tok")
    corrupt = tmp_path / "tokenizer.json"
    corrupt.write_text("{not json")
    with pytest.raises(SLMError, match="tokenizer.json"):
        load_tokenizer(corrupt)
    with pytest.raises(SLMError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "byte", ')
    with pytest.raises(SLMError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(SLMError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "byte", "vocab_size": 300}')
    with pytest.raises(SLMError, match="vocab_size 300"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SLMError, match="neither"):
        load_tokenizer(tmp_path / "empty")


# --- the Llama 3.2 SLM recipe: SLMTokenizer.from_pretrained ----------------------------------------------

def test_slm_tokenizer_loads_every_kind_of_folder(bpe: BPETokenizer, tmp_path: Path) -> None:
    import transformers

    from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM
    from simplified_slm.tokenizers import SLMTokenizer

    text = "Once upon a time, a cat sat."
    expected = bpe.encode_ids(text)
    SLMTokenizer(bpe).save_pretrained(tmp_path / "saved")  # our tokenizer folder
    model = LlamaForCausalLM(LlamaConfig.preset("tiny", vocab_size=bpe.vocab_size))
    model.save_pretrained(tmp_path / "checkpoint", tokenizer=SLMTokenizer(bpe))  # model/checkpoint folder
    bpe.save(tmp_path / "run" / "tokenizer")  # a training run keeps it in a subfolder
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.hf, eos_token="<|endoftext|>")
    hf.save_pretrained(str(tmp_path / "hf"))  # HF-style folder with tokenizer.json
    for source in ("saved", "checkpoint", "run", "hf", "hf/tokenizer.json"):
        tok = SLMTokenizer.from_pretrained(tmp_path / source)
        assert tok.encode(text) == expected, source
        assert tok.decode(torch.tensor(expected)) == text
        assert len(tok) == tok.vocab_size == bpe.vocab_size
        assert (tok.eos_token_id, tok.pad_token_id) == (bpe.eos_token_id, bpe.pad_token_id), source
    assert hf(text).input_ids == expected  # and transformers reads our folder the same way
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert reloaded(text).input_ids == expected


def test_slm_tokenizer_specials_and_errors(tmp_path: Path) -> None:
    from simplified_slm.tokenizers import SLMTokenizer

    tok = SLMTokenizer.from_pretrained(sentencepiece_style(tmp_path / "llama2"))
    ids = tok.encode("ab", add_special_tokens=True)
    assert ids[0] == tok.bos_token_id == 1 and tok.unk_token_id == 0
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "ab"
    byte = SLMTokenizer(ByteTokenizer())
    assert byte.encode("hi", add_special_tokens=True) == [104, 105]  # no BOS to add
    byte.save_pretrained(tmp_path / "byte")
    assert SLMTokenizer.from_pretrained(tmp_path / "byte").decode([104, 105]) == "hi"
    with pytest.raises(SLMError, match="tokenizer not found"):
        SLMTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SLMError, match="neither"):
        SLMTokenizer.from_pretrained(tmp_path / "empty")


# --- a local Llama-style tokenizer.json: pad = eos, right padding (issue 5) ----------------

def llama_style(directory: Path, text: str) -> Path:
    """A Llama-2 style tokenizer.json trained here: SentencePiece-like BPE ("\u2581" spaces,
    <0xNN> byte fallback), `<unk>`, `<s>`, `</s>`, a BOS-adding post-processor, no pad token."""
    from tokenizers import processors, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                       special_tokens=["<unk>", "<s>", "</s>", *byte_tokens]))
    hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir()
    hf.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_llama_style_tokenizer_pads_right_with_eos_for_a_bitnet_model(tmp_path: Path) -> None:
    from simplified_slm.models.bitnet import BitNetConfig, BitNetForCausalLM

    stories = read_corpus("tinystories_valid.txt.gz", 60_000)
    path = llama_style(tmp_path / "llama", stories)
    tok = build_tokenizer(TokenizerConfig(kind="file", path=str(path)))  # loaded by path
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"
    texts = [s.strip() for s in stories.split("\n\n")[:3]]
    texts = [texts[0][:300], texts[1][:90], "Once upon a time"]
    rows = [tok.encode_ids(t) for t in texts]
    assert len({len(r) for r in rows}) == 3 and all(r[0] != tok.bos_token_id for r in rows)

    batch = tok.pad_batch(texts)
    ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
    width = max(len(r) for r in rows)
    assert ids.shape == mask.shape == (3, width)
    for i, row in enumerate(rows):
        assert ids[i, :len(row)].tolist() == row and ids[i, len(row):].eq(tok.eos_token_id).all()
        assert mask[i].tolist() == [1] * len(row) + [0] * (width - len(row))
    assert tok.pad_batch(texts, max_length=5)["input_ids"].shape == (3, 5)

    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig.preset("tiny", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        assert torch.isfinite(padded).all()
        alone = [model(torch.tensor([row])).logits[0] for row in rows]
        for i, row in enumerate(rows):  # the real tokens see exactly what they see alone
            assert (padded[i, :len(row)] - alone[i]).abs().max() <= 1e-5
        # training on the padded batch: pad labels ignored, the loss is the mean over real tokens
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(ids, attention_mask=mask, labels=labels).loss
        per_token = torch.cat([torch.nn.functional.cross_entropy(a[:-1], torch.tensor(r[1:]), reduction="none")
                               for a, r in zip(alone, rows)])
        assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-5)
