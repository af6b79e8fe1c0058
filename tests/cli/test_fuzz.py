"""Fuzzing bad input: configs, prompts and prompt files, corpora, checkpoint manifests.

The contract under test is the project's error rule: anything a user can get wrong raises
`SLMError` with a one-line message (the CLI prints it as `error: ...` and exits 2) and
nothing else escapes, while valid input still works. Tokenizer round trips are fuzzed in
tests/tokenizers/test_tokenizers.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import REPO
from simplified_slm import SLMError
from simplified_slm.cli.generate_cmd import complete
from simplified_slm.cli.main import main
from simplified_slm.configbase import read_config_file
from simplified_slm.data import DataConfig, load_prepared, prepare_dataset, read_documents
from simplified_slm.models import GPTConfig, build_model
from simplified_slm.models.registry import config_class, config_from_dict, families
from simplified_slm.tokenizers import ByteTokenizer, CharTokenizer, TokenizerConfig
from simplified_slm.training.checkpoint import CheckpointManager, verify_checkpoint
from simplified_slm.training.config import (
    ExperimentConfig,
    HookConfig,
    TrainConfig,
    apply_overrides,
    load_experiment_config,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CASES: Counter = Counter()  # examples run per target, printed at the end (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _print_cases():
    yield
    if CASES:
        print("\n[fuzz] " + ", ".join(f"{k}: {v}" for k, v in sorted(CASES.items())))


def assert_one_line(err: SLMError) -> None:
    message = str(err)
    assert message and "\n" not in message and "\r" not in message, repr(message)


def slm_error_or_value(fn, *args):
    """fn(*args), or None when it raised an SLMError with a one-line message; any other
    exception is a crash and propagates to hypothesis."""
    try:
        return fn(*args)
    except SLMError as err:
        assert_one_line(err)
        return None


# ------------------------------------------------------------------------- configs
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(),
                    st.text(max_size=12))
GARBAGE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
PLAUSIBLE = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([0.0, 0.5, 1e-3, -1.0, 1.5, float("nan"), float("inf"), 2.0, 4.0]),
    st.sampled_from(["byte", "char", "bpe", "file", "ascii", "corpus", "gpt", "hgrn_bit", "cosine", "linear",
                     "constant", "random", "sequential", "adamw", "fp32", "bf16", "auto", "cpu", "cuda:0",
                     "csv", "console", "tinyshakespeare", "", ".txt", "txt", "raise", "skip", "small",
                     "activation_stats", "a\nb", "x" * 300]),
    st.lists(st.sampled_from(["csv", ".txt", "x", 1, None]), max_size=3),
    st.just([0.9, 0.99]),
)
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, GARBAGE)


def section(names: list[str]) -> st.SearchStrategy:
    real = st.sampled_from(names)
    key = st.one_of(real, real, real, real, st.text(max_size=10))  # mostly real field names
    return st.dictionaries(key, VALUES, max_size=6)


def model_section() -> st.SearchStrategy:
    names = sorted({n for f in families() for n in config_class(f).field_names()} | {"preset"})
    family = st.one_of(st.sampled_from(families()), st.none(), st.text(max_size=6), st.integers())

    def assemble(fields: dict, fam) -> dict:
        if isinstance(fields.get("preset"), (list, dict)):  # pinned by test_unhashable_family_or_preset...
            fields["preset"] = str(fields["preset"])
        return {**fields, "family": fam} if fam is not None else fields
    return st.builds(assemble, section(names), family)


SECTIONS = {
    "train": section(TrainConfig.field_names()),
    "data": section(DataConfig.field_names()),
    "tokenizer": section(TokenizerConfig.field_names()),
    "hooks": st.lists(st.one_of(section(HookConfig.field_names()), GARBAGE), max_size=2),
    "model": model_section(),
}
EXPERIMENTS = st.fixed_dictionaries({}, optional={
    **{name: st.one_of(strategy, strategy, strategy, GARBAGE) for name, strategy in SECTIONS.items()},
    "seed": VALUES, "output_dir": VALUES, "run_name": VALUES, "bogus": VALUES,
})


def check_round_trip(cfg: ExperimentConfig) -> None:
    """A parsed config is stored as JSON (checkpoints, run.json) and must reload the same."""
    text = json.dumps(cfg.to_dict(), sort_keys=True)
    assert len(cfg.hash()) == 16
    again = ExperimentConfig.from_dict(json.loads(text))
    assert json.dumps(again.to_dict(), sort_keys=True) == text


@FUZZ
@given(EXPERIMENTS)
def test_experiment_config_only_raises_slm_errors(data):
    CASES["config: ExperimentConfig.from_dict"] += 1
    cfg = slm_error_or_value(ExperimentConfig.from_dict, data)
    if cfg is not None:
        check_round_trip(cfg)


@FUZZ
@given(st.sampled_from(["train", "data", "tokenizer", "hooks"]), st.data())
def test_each_section_only_raises_slm_errors(name, data):
    CASES[f"config: {name} section"] += 1
    cls = {"train": TrainConfig, "data": DataConfig, "tokenizer": TokenizerConfig, "hooks": HookConfig}[name]
    value = data.draw(st.one_of(section(cls.field_names()), GARBAGE))
    slm_error_or_value(cls.from_dict, value)


@FUZZ
@given(model_section())
def test_model_section_only_raises_slm_errors(data):
    """`config_from_dict` also parses config.json of every model folder a user loads."""
    CASES["config: model section (config_from_dict)"] += 1
    cfg = slm_error_or_value(config_from_dict, data)
    if cfg is not None:
        assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


OVERRIDE = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, v: f"{k}={v}",
              st.sampled_from(["train.max_steps", "train", "model.family", "model.n_heads", "hooks", "seed",
                               "data.extensions", "a..b", "", ".", "tokenizer.kind.x", "train.lr"]),
              st.sampled_from(["3", "1e-3", "true", "[1, 2]", "{a: 1}", "null", "'x'", "[", "{", "2020-01-01",
                               "!!python/object/apply:os.system ['true']", "&a [*a]", "- 1", "\x00",
                               "[{name: activation_stats, params: {every: 2}}]",
                               "[{name: activation_stats, params: {when: 2020-01-01}}]",
                               "[{name: activation_stats, params: {1: 2}}]"])),
)


@FUZZ
@given(st.lists(OVERRIDE, max_size=4))
def test_set_overrides_only_raise_slm_errors(overrides):
    CASES["config: --set overrides"] += 1
    data = slm_error_or_value(apply_overrides, {"model": {"family": "gpt"}}, overrides)
    if data is not None:
        cfg = slm_error_or_value(ExperimentConfig.from_dict, data)
        if cfg is not None:
            check_round_trip(cfg)


CONFIG_TEXTS = st.one_of(
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.text(max_size=80),
    st.sampled_from([
        "train: {max_steps: 5}", "[1, 2]", "model: !!python/object/apply:os.system ['true']",
        "train:\n  max_steps: 2020-01-01", "hooks: [{name: x, params: {at: 2020-01-01}}]",
        "a: &x [1]\nb: *x", "{\"train\": {\"lr\": NaN}}", "{\"train\": {\"lr\": Infinity}}", "\ufeff{}",
        "%YAML 1.1\n---\n{}", "? [a]\n: 1", "train: {betas: [0.9]}", "{" * 50,
    ]),
)


@SLOWER
@given(CONFIG_TEXTS, st.sampled_from([".json", ".yaml", ".yml"]))
def test_config_files_only_raise_slm_errors(tmp_path_factory, text, suffix):
    CASES["config: files (.json/.yaml)"] += 1
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / f"cfg{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    slm_error_or_value(read_config_file, path)
    cfg = slm_error_or_value(load_experiment_config, path, [])
    if cfg is not None:
        check_round_trip(cfg)


@pytest.mark.parametrize("data", [
    {"model": {"family": "gpt", "vocab_size": {}}},
    {"model": {"family": ["gpt"]}},
    {"model": {"family": "gpt", "preset": []}},
])
def test_unhashable_model_values_get_a_message_naming_the_field(data):
    """Raised as SLMError, but only because ConfigBase.from_dict turns *any* TypeError into
    one: the message is Python's ('unhashable type', "'<' not supported")."""
    with pytest.raises(SLMError) as err:
        ExperimentConfig.from_dict(data)
    CASES["config: known bad messages"] += 1
    assert "unhashable" not in str(err.value) and "not supported between" not in str(err.value)


@pytest.mark.parametrize("data", [{"family": ["gpt"]}, {"family": "gpt", "preset": ["small"]}])
def test_unhashable_family_or_preset_in_a_model_config_is_an_slm_error(data):
    """config_from_dict parses the config.json of every model folder `slm generate/eval` loads."""
    with pytest.raises(SLMError, match="x/config.json"):
        config_from_dict(data, where="x/config.json")


# ---------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Untrained tiny GPTs saved as model folders: byte-level and ASCII char-level."""
    root = tmp_path_factory.mktemp("models")
    folders = {}
    for name, tokenizer in (("byte", ByteTokenizer()), ("char", CharTokenizer())):
        torch.manual_seed(0)
        model = build_model(GPTConfig(vocab_size=tokenizer.vocab_size, n_layers=1, d_model=16, n_heads=2,
                                      context_length=32, dropout=0.0))
        model.save_pretrained(root / name, tokenizer=tokenizer)
        folders[name] = (root / name, model.eval(), tokenizer)
    return folders


def gen_args(**overrides) -> argparse.Namespace:
    base = dict(max_tokens=4, greedy=False, temperature=0.8, top_k=None, top_p=None, repetition_penalty=1.0,
                seed=0)
    return argparse.Namespace(**{**base, **overrides})


PROMPTS = st.one_of(
    st.text(max_size=60),  # any Unicode except lone surrogates (not UTF-8 encodable)
    st.text(alphabet=st.characters(max_codepoint=127), max_size=40),
    st.sampled_from(["", " ", "\n", "\x00", "\ufeff", "\u202e", "👩‍👩‍👧", "x" * 32, "x" * 33, "é" * 16, "é" * 17,
                     "\r\n" * 5, "\ufffd"]),
)


@SLOWER
@given(st.sampled_from(["byte", "char"]), PROMPTS)
def test_any_prompt_completes_or_is_one_clear_error(tiny_models, kind, prompt):
    CASES["generate: prompts (Python API)"] += 1
    _, model, tokenizer = tiny_models[kind]
    with torch.no_grad():
        text = slm_error_or_value(complete, model, tokenizer, prompt, gen_args())
    ids = tokenizer.encode_ids(prompt)
    if text is None:
        assert not ids or len(ids) > model.max_context  # refused only when empty or too long
    else:
        assert isinstance(text, str) and 0 < len(ids) <= model.max_context


def test_lone_surrogate_prompt_via_the_api_behaviour(tiny_models):
    """A str holding a lone surrogate cannot be encoded as UTF-8. The char tokenizer maps it
    to <UNK>; with the byte tokenizer the prompt is refused with a one-line error."""
    _, model, tokenizer = tiny_models["char"]
    assert isinstance(complete(model, tokenizer, "a\udcff", gen_args()), str)
    _, model, tokenizer = tiny_models["byte"]
    with pytest.raises(SLMError, match="not valid UTF-8"):
        complete(model, tokenizer, "a\udcff", gen_args())


def run_cli(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "simplified_slm.cli", *args], input=stdin, env=env,
                          capture_output=True, timeout=120)


def test_non_utf8_prompt_argument_is_one_clear_error(tiny_models, capsys):
    prompt = os.fsdecode(b"caf\xe9")  # exactly what Python makes of `slm generate --prompt $'caf\xe9'`
    assert prompt == "caf\udce9"
    code = main(["generate", "--model_path", str(tiny_models["byte"][0]), "--max_tokens", "3", "--prompt", prompt])
    assert code == 0 or capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize("option,value", [("--top_k", "-1"), ("--top_p", "0"), ("--top_p", "-0.5"),
                                          ("--temperature", "nan"), ("--repetition_penalty", "nan")])
def test_bad_sampling_options(tiny_models, capsys, option, value):
    """Sampling options are not validated: these reach torch and fail inside it."""
    CASES["generate: bad sampling options"] += 1
    folder = str(tiny_models["byte"][0])
    code = main(["generate", "--model_path", folder, "--prompt", "ab", "--max_tokens", "3", option, value])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: ")


LINES = st.lists(st.one_of(
    st.text(max_size=40).map(lambda t: t.replace("\n", " ").replace("\r", " ").encode("utf-8")),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
    st.sampled_from([b"", b"   ", b"\xff\xfe broken", b"caf\xe9", b"x" * 100, b"ok line", b"\xed\xa0\x80"]),
), max_size=8)


@SLOWER
@given(LINES)
def test_prompt_file_reports_each_bad_line_and_completes_the_rest(tiny_models, tmp_path_factory, lines):
    CASES["generate: prompt files"] += 1
    folder, model, tokenizer = tiny_models["byte"]
    work = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    prompts, out = work / "prompts.txt", work / "out.jsonl"
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    expected, bad = [], []
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
            continue
        if not text.strip():
            continue
        (expected if len(raw) <= model.max_context else bad).append(number)
    with _capture_stderr() as err:
        code = main(["generate", "--model_path", str(folder), "--prompt_file", str(prompts), "--output_file",
                     str(out), "--max_tokens", "2", "--seed", "1"])
    assert code == (1 if bad else 0)  # skipped lines: a summary and exit code 1
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == expected
    warned = err.getvalue()
    for number in bad:
        assert f"{prompts}:{number}" in warned
    assert "Traceback" not in warned


class _capture_stderr:
    def __enter__(self):
        import io

        self.buffer, self.saved = io.StringIO(), sys.stderr
        sys.stderr = self.buffer
        return self.buffer

    def __exit__(self, *exc):
        sys.stderr = self.saved


def test_in_process_generate_leaves_grad_mode_alone(tiny_models):
    """(It used to switch autograd off for the whole process, breaking later in-process training.)"""
    torch.set_grad_enabled(True)
    assert main(["generate", "--model_path", str(tiny_models["byte"][0]), "--prompt", "ab",
                 "--max_tokens", "2"]) == 0
    assert torch.is_grad_enabled()


def test_interactive_with_stdin_closed_at_once(tiny_models):
    result = run_cli("generate", "--model_path", str(tiny_models["byte"][0]), "--interactive", stdin=b"")
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr


def _stdin(monkeypatch, data: bytes, errors: str) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors))


def test_interactive_reports_bad_prompts_and_goes_on(tiny_models, monkeypatch, capsys):
    _stdin(monkeypatch, b"x" * 40 + b"\n" + "\u00e9\u2603 \U0001F600".encode() * 3 + b"\nKING\n", "strict")
    folder = str(tiny_models["byte"][0])  # too long; multi-byte characters; good
    assert main(["generate", "--model_path", folder, "--interactive", "--max_tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "error: the prompt has 40 tokens" in err and ">>> KING" in out


def test_interactive_with_invalid_utf8_on_stdin(tiny_models, monkeypatch, capsys):
    _stdin(monkeypatch, b"caf\xe9\nKING\n", "strict")
    assert main(["generate", "--model_path", str(tiny_models["char"][0]), "--interactive", "--max_tokens", "3"]) == 0
    assert ">>> KING" in capsys.readouterr().out


def test_interactive_survives_ctrl_c_while_generating(tiny_models):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", "generate", "--model_path",
                             str(tiny_models["byte"][0]), "--interactive", "--max_tokens", "1000000"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"KING\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 60
        while len(seen) < len(b">>> KING") + 20:  # the prompt was read and tokens are streaming
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += os.read(proc.stdout.fileno(), 4096)
        proc.send_signal(signal.SIGINT)
        proc.stdin.close()  # then EOF at the next ">>> "
        proc.stdin = None
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"(interrupted)" in err
    CASES["generate: Ctrl-C while generating"] += 1


# --------------------------------------------------------------------- corpus files
def _gzip_garbage(data: bytes) -> bytes:
    packed = gzip.compress(data or b"x")
    return packed[:10] + bytes(b ^ 0x5A for b in packed[10:])  # valid header, corrupt stream


CONTENTS = st.one_of(
    st.text(max_size=50).map(lambda t: ("text", t.encode("utf-8"))),
    st.sampled_from([("empty", b""), ("whitespace", b"  \n\t"), ("binary", b"\x89PNG\x00\x00\x01"),
                     ("latin-1", "café naïve".encode("latin-1")), ("bom", "\ufeffhello".encode("utf-8")),
                     ("surrogate bytes", b"a\xed\xa0\x80b"), ("nul late", b"fine text\x00")]),
    st.binary(max_size=40).map(lambda b: ("bytes", b)),
)
JSON_CONTENTS = st.one_of(
    st.lists(st.one_of(st.fixed_dictionaries({"text": st.text(max_size=20)}), GARBAGE.map(json.dumps)
                       .map(json.loads)), max_size=3)
    .map(lambda records: ("records", "\n".join(json.dumps(r) for r in records).encode())),
    # (deeply nested JSON is pinned by test_corrupt_gzip_and_deeply_nested_json_name_the_file)
    st.sampled_from([("bad json", b'{"text": "a"}\n{"text": '), ("not a record", b'"just a string"\n'),
                     ("nested", b'{"text": "a", "meta": ' + b"[" * 50 + b"]" * 50 + b"}\n")]),
)
NAMES = ["a.txt", "b.md", "sub/c.txt", "sub/deeper/d.TXT", ".hidden.txt", "e.jsonl", "f.json", "g.txt.gz",
         "h.log"]


@st.composite
def corpus_folders(draw):
    files = {}
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=6, unique=True)):
        if name.endswith((".jsonl", ".json")):
            files[name] = draw(JSON_CONTENTS)
        elif name.endswith(".gz"):
            kind, data = draw(CONTENTS)
            # (a valid header over a corrupt stream is pinned by the same test)
            files[name] = draw(st.sampled_from([(f"gz {kind}", gzip.compress(data)), ("gz not gzip", data),
                                                ("gz truncated", gzip.compress(data)[:15])]))
        else:
            files[name] = draw(CONTENTS)
    return files


def _plain_text(kind_data: tuple[str, bytes], on_error: str) -> str | None:
    """The document text of a plain .txt/.md file, or None when it must be refused; skip
    mode leaves out undecodable bytes only."""
    data = kind_data[1]
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="ignore") if on_error == "skip" else None


def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]


@SLOWER
@given(corpus_folders(), st.sampled_from(["raise", "skip"]))
def test_corpus_folders_give_per_file_errors_or_skips(tmp_path_factory, files, on_error):
    CASES[f"data: corpus folders (on_error={on_error})"] += 1
    root = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp()))
    src = root / "corpus"
    for name, (_, data) in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        docs = slm_error_or_value(lambda: list(read_documents(src, on_error=on_error)))
    skipped = stderr.getvalue().splitlines()  # one warning line per file with something skipped
    assert all(m.startswith("warning: skipped ") for m in skipped), skipped
    if on_error == "raise":
        assert not skipped
    for name, content in files.items():
        path = src / name
        if name.startswith(".") or name.endswith((".log", ".gz", ".json", ".jsonl")):
            continue
        text = _plain_text(content, on_error)
        if docs is not None and text != _plain_text(content, "raise"):
            assert any(str(path) in m for m in skipped), (name, skipped)  # refused or cut files are named
        if docs is not None and text:
            assert text in [d.text for d in docs]  # good files come through whole
    if docs is not None:  # nothing from a skipped file leaks in
        assert not any(f"skipped {d.name.split('[')[0]}:" in m for d in docs for m in skipped)
    # preparing the same folder: a consistent dataset or an SLMError, never debris
    out = root / "prepared"
    cfg = slm_error_or_value(DataConfig.from_dict, {"dataset": str(src), "on_error": on_error,
                                                    "extensions": [".txt", ".md", ".jsonl", ".json", ".gz"]})
    assert cfg is not None
    with contextlib.redirect_stderr(io.StringIO()):
        data = slm_error_or_value(prepare_dataset, cfg, ByteTokenizer(), out)
    if out.exists():
        assert not _temp_files(out), _temp_files(out)
    if data is not None:
        reread = load_prepared(out)
        assert len(reread.train) + len(reread.val) == reread.meta["splits"]["train"]["bytes"] + \
            reread.meta["splits"]["val"]["bytes"]
    else:
        assert not (out / "meta.json").exists()


@pytest.mark.parametrize("name,data", [("bad.txt.gz", _gzip_garbage(b"hello world " * 20)),
                                       ("deep.json", b"[" * 100_000)], ids=["corrupt-gzip", "deep-json"])
def test_corrupt_gzip_and_deeply_nested_json_name_the_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SLMError, match=name.replace(".", r"\.")):
        list(read_documents(path))


# ------------------------------------------------------------------ checkpoint manifest
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    manager = CheckpointManager(root, say=lambda m: None)

    def write(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(os.urandom(300))
        (directory / "trainer_state.json").write_text('{"step": 1}')
    return manager.save(1, write)


@FUZZ
@given(st.data())
def test_damaged_manifests_only_raise_slm_errors(small_checkpoint, tmp_path_factory, data):
    CASES["checkpoint: damaged manifest.json"] += 1
    original = (small_checkpoint / "manifest.json").read_bytes()
    how = data.draw(st.sampled_from(["bit flips", "bytes", "json"]))
    if how == "bit flips":
        damaged = bytearray(original)
        for _ in range(data.draw(st.integers(1, 3))):
            position = data.draw(st.integers(0, len(damaged) - 1))
            damaged[position] ^= 1 << data.draw(st.integers(0, 7))
        damaged = bytes(damaged)
    elif how == "bytes":
        damaged = data.draw(st.binary(max_size=200))
    else:
        files = data.draw(st.one_of(GARBAGE, st.dictionaries(st.sampled_from(
            ["model.safetensors", "trainer_state.json", "../x", "/etc/hostname", "", "nope"]), GARBAGE)))
        damaged = json.dumps({"files": files}).encode()
    assume(damaged != original)
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / small_checkpoint.name
    folder.mkdir()
    for path in small_checkpoint.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "manifest.json").write_bytes(damaged)
    try:
        verify_checkpoint(folder)
    except SLMError as err:
        assert_one_line(err)
    else:  # accepted: every file it lists must really be intact and inside the folder
        listed = json.loads(damaged)["files"]
        assert all("/" not in name for name in listed)
