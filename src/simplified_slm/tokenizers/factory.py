"""Build a tokenizer from its config section, or load one saved next to a checkpoint.

Loading reads only JSON (tokenizer_config.json or slm_tokenizer_config.json, vocab.json,
tokenizer.json): a tokenizer directory downloaded from anywhere can never run code.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterable, Literal

from simplified_slm.configbase import ConfigBase, read_config_file
from simplified_slm.errors import SLMError
from simplified_slm.tokenizers.base import SLM_TOKENIZER_CONFIG, TOKENIZER_CONFIG, Tokenizer
from simplified_slm.tokenizers.bpe import TOKENIZER_FILE, BPETokenizer, min_bpe_vocab_size
from simplified_slm.tokenizers.byte import ByteTokenizer
from simplified_slm.tokenizers.char import CharPolicy, CharTokenizer
from simplified_slm.tokenizers.chat_template import read_chat_template
from simplified_slm.utils.progress import heartbeat, texts_with_progress

RUN_TOKENIZER_DIR = "tokenizer"  # where `slm train` saves the tokenizer inside a run folder
_SAVED_KINDS: dict[str, type[Tokenizer]] = {cls.kind: cls for cls in (ByteTokenizer, CharTokenizer, BPETokenizer)}


@dataclasses.dataclass
class TokenizerConfig(ConfigBase):
    """Which tokenizer a run uses; "file" loads a tokenizer.json or a saved directory."""

    kind: Literal["byte", "char", "bpe", "file"] = "byte"
    vocab_size: int | None = None
    char_policy: CharPolicy = "ascii"
    path: str | None = None

    def validate(self) -> None:
        # Settings that the chosen kind ignores are rejected: a silently unused vocab_size
        # or path is almost always a typo in `kind`.
        if self.kind == "bpe":
            if self.vocab_size is None:
                self._fail("vocab_size", "kind 'bpe' trains a new vocab; set vocab_size (e.g. 4096)")
            elif self.vocab_size < min_bpe_vocab_size():
                self._fail("vocab_size", f"{self.vocab_size} is too small for BPE; use at least {min_bpe_vocab_size()}")
        elif self.vocab_size is not None:
            self._fail("vocab_size", f"only kind 'bpe' takes a vocab_size (kind is '{self.kind}'); remove it")
        if self.kind == "file" and not self.path:
            self._fail("path", "kind 'file' needs path to a tokenizer.json or a saved tokenizer directory")
        if self.kind != "file" and self.path is not None:
            self._fail("path", f"only kind 'file' takes a path (kind is '{self.kind}'); remove it or set kind: file")


def build_tokenizer(cfg: TokenizerConfig, texts: Callable[[], Iterable[str]] | None = None) -> Tokenizer:
    """`texts` is a callable so corpora are only read for the kinds that learn a vocab."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "file":
        assert cfg.path is not None, "TokenizerConfig.validate requires path for kind 'file'"
        return load_tokenizer(cfg.path)
    if cfg.kind == "char" and cfg.char_policy == "ascii":
        return CharTokenizer()
    if texts is None:
        raise SLMError(f"tokenizer kind '{cfg.kind}' learns its vocab from the training texts, but none "
                       "were given; pass texts= to build_tokenizer")
    # learning a vocab reads the whole corpus: say how far it got (see utils/progress.py)
    read = texts_with_progress(texts(), f"tokenizer ({cfg.kind}): reading text")
    if cfg.kind == "char":
        return CharTokenizer.from_corpus(read)
    with heartbeat(f"tokenizer (bpe): learning a {cfg.vocab_size}-token vocab"):
        return BPETokenizer.train(read, vocab_size=cfg.vocab_size or 0)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a directory written by `Tokenizer.save` (a tokenizer, model or checkpoint folder),
    a run folder (its `tokenizer/`), an HF tokenizer directory or a tokenizer.json; the chat
    template the folder ships comes along (`Tokenizer.chat_template`)."""
    tokenizer = _load_tokenizer(Path(path))
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / TOKENIZER_CONFIG).is_file() and (folder / RUN_TOKENIZER_DIR).is_dir():
        folder = folder / RUN_TOKENIZER_DIR
    tokenizer.chat_template = read_chat_template(folder)
    return tokenizer


def _load_tokenizer(path: Path) -> Tokenizer:
    if path.is_file():
        return BPETokenizer.from_file(path)
    if not path.is_dir():
        raise SLMError(f"tokenizer not found: {path}; pass a saved tokenizer directory or a tokenizer.json file")
    if not any((path / name).is_file() for name in (TOKENIZER_CONFIG, SLM_TOKENIZER_CONFIG, TOKENIZER_FILE)) \
            and (path / RUN_TOKENIZER_DIR / TOKENIZER_CONFIG).is_file():
        path = path / RUN_TOKENIZER_DIR  # a training run keeps its tokenizer in a subfolder
    config_path = path / SLM_TOKENIZER_CONFIG  # a transformers export keeps ours aside
    if not config_path.is_file():
        config_path = path / TOKENIZER_CONFIG
    config = read_config_file(config_path) if config_path.is_file() else {}
    if "kind" not in config:  # an HF directory: tokenizer.json plus maybe HF's own config
        if not (path / TOKENIZER_FILE).is_file():
            raise SLMError(f"{path} holds neither {TOKENIZER_CONFIG} nor {TOKENIZER_FILE}; "
                           "pass the directory Tokenizer.save wrote")
        return BPETokenizer.from_file(path / TOKENIZER_FILE)
    kind = config["kind"]
    if kind not in _SAVED_KINDS:
        raise SLMError(f"{config_path}: unknown tokenizer kind {kind!r}; expected one of {sorted(_SAVED_KINDS)}")
    tokenizer = _SAVED_KINDS[kind]._load_files(path, config)
    if config.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
        raise SLMError(f"{config_path} says vocab_size {config['vocab_size']} but the saved vocab has "
                       f"{tokenizer.vocab_size} ids; the files do not belong together, save the tokenizer again")
    return tokenizer
