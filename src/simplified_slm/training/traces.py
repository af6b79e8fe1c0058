"""Teacher traces (sequence-level distillation): a teacher answers prompts, a student is later
SFT-trained on the answers, so teacher and student need not share a tokenizer.

Logit KD (`distill.py`) stays for same-tokenizer teachers; this is the other route (seed
003's second stage). Prompts are JSONL: `{"prompt": text}` (sent as is) or `{"messages":
[...]}` (rendered with the teacher's chat template, `tokenizers/chat_template.py`), with an
optional `"id"` (default: the line number). Output rows are `{"id", "prompt" | "messages",
"completion"}` (chat SFT data as it stands: `data/chat.py` takes a chat record's completion
as the reply to its messages), written and flushed per batch, so a killed run loses at most the batch in
flight: a rerun keeps the finished rows, drops a cut-off last line and answers only the
rest (`utils/resumable.py`, shared with `slm generate --prompt_file`); `<out>.settings.json`
records the teacher and settings, and a rerun with others is refused rather than mixed (the
batch size may change).

Teachers: anything `models.load` opens, decoded in left-padded batches through our cached
`generation.generate` (each row gets exactly the tokens it would get alone, so greedy traces
do not depend on the batch size); a transformers folder of an architecture we cannot import
runs through `transformers.AutoModelForCausalLM.generate` with its own tokenizer.
Sampling (`temperature > 0`) is seeded per batch (`seed` + the batch's first prompt index):
an uninterrupted run repeats, a resumed one draws other, equally valid samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from simplified_slm.errors import SLMError
from simplified_slm.utils.io import atomic_write_json
from simplified_slm.utils.progress import progress
from simplified_slm.utils.resumable import append_after, earlier_rows


@dataclass(frozen=True)
class TraceSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    batch_size: int = 8
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise SLMError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise SLMError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.temperature >= 0:
            raise SLMError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SLMError(f"--top-p must be in (0, 1], got {self.top_p}")


class Teacher(Protocol):
    def render(self, record: dict) -> str:
        """The prompt text of a record (a chat one through the teacher's template)."""

    def complete(self, prompts: Sequence[str], settings: TraceSettings, seed: int) -> list[str]:
        """One completion per prompt, decoded up to the teacher's end-of-sequence token."""


def read_prompt_records(path: str | Path) -> list[dict]:
    """`{"id", "prompt" | "messages"}` for each non-blank line; SLMError naming a bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SLMError(f"cannot read --prompts {path} ({type(err).__name__}); pass a UTF-8 JSONL file") from None
    records, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise SLMError(f"{where} is not JSON; each line is {{\"prompt\": ...}} or {{\"messages\": [...]}}") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
            raise SLMError(f"{where} needs exactly one of \"prompt\" or \"messages\"")
        if "prompt" in row and not isinstance(row["prompt"], str):
            raise SLMError(f"{where}: \"prompt\" must be a string")
        if "messages" in row and not (isinstance(row["messages"], list) and row["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"])):
            raise SLMError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} strings")
        record_id = row.get("id", number)
        if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) or record_id in seen:
            raise SLMError(f"{where}: id {record_id!r} is not a string/integer or is used twice")
        seen.add(record_id)
        key = "prompt" if "prompt" in row else "messages"
        records.append({"id": record_id, key: row[key]})
    if not records:
        raise SLMError(f"--prompts {path} holds no prompts")
    return records


class OurTeacher:
    """A model `models.load` opened: left-padded batches through `generation.generate`."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from simplified_slm.tokenizers.chat_template import ChatTemplate

        self.model, self.tokenizer = model, tokenizer
        self.template = ChatTemplate.for_tokenizer(tokenizer)

    def render(self, record: dict) -> str:
        return record["prompt"] if "prompt" in record else self.template.render(record["messages"])

    def complete(self, prompts: Sequence[str], settings: TraceSettings, seed: int) -> list[str]:
        from simplified_slm.generation.generate import generate, left_pad

        rows = [self.tokenizer.encode_ids(p) for p in prompts]
        eos = self.tokenizer.eos_token_id
        ids, mask = left_pad(rows, self.tokenizer.pad_token_id or 0, self.model.device)
        greedy = settings.temperature == 0
        out = generate(self.model, ids, settings.max_new_tokens, attention_mask=mask, greedy=greedy,
                       temperature=1.0 if greedy else settings.temperature, top_p=settings.top_p,
                       eos_token_id=eos, seed=seed)
        return [self.tokenizer.decode(_until(row.tolist(), eos)) for row in out[:, ids.shape[1]:]]


class TransformersTeacher:
    """A transformers causal LM we cannot import into our families, with its own tokenizer."""

    def __init__(self, folder: Path, device: torch.device) -> None:
        import transformers

        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), padding_side="left")
        if self.tokenizer.pad_token_id is None:  # padded positions are masked: any token will do
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.convert_ids_to_tokens(0)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, use_safetensors=True).to(device).eval()

    def render(self, record: dict) -> str:
        if "prompt" in record:
            return record["prompt"]
        if self.tokenizer.chat_template is None:
            from simplified_slm.tokenizers.chat_template import ChatTemplate

            return ChatTemplate(None, eos_token=self.tokenizer.eos_token or "").render(record["messages"])
        return self.tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def complete(self, prompts: Sequence[str], settings: TraceSettings, seed: int) -> list[str]:
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.model.device)
        torch.manual_seed(seed)
        sample = settings.temperature > 0
        out = self.model.generate(**batch, max_new_tokens=settings.max_new_tokens, do_sample=sample,
                                  temperature=settings.temperature if sample else None,
                                  top_p=settings.top_p if sample else None, top_k=None,
                                  pad_token_id=self.tokenizer.pad_token_id)
        eos = self.model.generation_config.eos_token_id
        return [self.tokenizer.decode(_until(row.tolist(), eos), skip_special_tokens=True)
                for row in out[:, batch["input_ids"].shape[1]:]]


def _until(ids: list[int], eos: int | list[int] | None) -> list[int]:
    """The ids before the first end-of-sequence id."""
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


def open_teacher(path: str | Path, device: str | torch.device = "auto") -> Teacher:
    """Our loader for every format it reads; transformers itself for other architectures."""
    from simplified_slm.export.hf import importable
    from simplified_slm.models.loading import ModelSource, load, resolve_device

    source = ModelSource.open(path)
    if source.kind == "transformers":
        model_type = json.loads((source.path / "config.json").read_text(encoding="utf-8")).get("model_type")
        if not importable(model_type):
            return TransformersTeacher(source.path, resolve_device(device))
    model, tokenizer, _ = load(path, device)
    return OurTeacher(model, tokenizer)


def _kept_rows(out: Path, records: list[dict], meta: dict) -> list[dict]:
    """The rows an earlier run with the same teacher and settings finished."""
    meta_path = settings_path(out)
    rows = earlier_rows(out)
    if not rows:
        return []
    try:
        earlier = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if earlier != meta:
        raise SLMError(f"--out {out} holds traces from another teacher or other settings ({meta_path} "
                       "differs); delete it or choose another file")
    known, kept = {r["id"] for r in records}, {}
    for number, row in rows:
        if not (isinstance(row, dict) and "completion" in row and row.get("id") in known) or row["id"] in kept:
            raise SLMError(f"--out {out} line {number} is not a trace of a prompt in --prompts (or repeats "
                           "one); delete it or choose another file")
        kept[row["id"]] = row
    return list(kept.values())


def settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".settings.json")


def write_traces(teacher: Teacher, records: list[dict], out: str | Path, settings: TraceSettings,
                 teacher_name: str, say: Callable[[str], None] = print, show_progress: bool = True) -> dict:
    """Answer every record not yet in `out`, appending one row per answer, flushed per batch."""
    settings.check()
    out = Path(out)
    # the batch size changes no greedy answer (and a resumed sampled run draws anew anyway)
    meta = {"teacher": teacher_name, **{k: v for k, v in asdict(settings).items() if k != "batch_size"}}
    kept = _kept_rows(out, records, meta)
    done = {row["id"] for row in kept}
    todo = [(index, r) for index, r in enumerate(records) if r["id"] not in done]
    if kept:
        say(f"resuming: {len(kept)} of {len(records)} prompts already answered in {out}")
    atomic_write_json(settings_path(out), meta)
    bar = progress(total=len(records), initial=len(kept), desc="traces", unit="prompt", disable=not show_progress)
    with append_after(out, kept) as sink:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start:start + settings.batch_size]
            completions = teacher.complete([teacher.render(r) for _, r in batch], settings,
                                           seed=settings.seed + batch[0][0])
            sink.write("".join(json.dumps({**r, "completion": c}) + "\n" for (_, r), c in zip(batch, completions)))
            sink.flush()
            bar.update(len(batch))
    bar.close()
    return {"out": str(out), "prompts": len(records), "written": len(todo), "kept": len(kept)}
