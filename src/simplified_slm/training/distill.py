"""Knowledge distillation: a frozen teacher's softened next-token distribution as a second target.

Loss per batch (Hinton et al., 2015, and the Llama 3.2 distillation recipe):

    total = alpha * T² * KD + (1 - alpha) * CE

CE is the usual next-token cross-entropy. KD is the mean over the non-ignored target
positions (never over the vocab) of

    KD_t = sum_{i in S} p_i (log p_i - log q_i),
    p = softmax(teacher_logits[S] / T)          (renormalised over S)
    q = softmax(student_logits / T)             (over the student's whole vocab, read at S)

where S is the set of ids the teacher's logits are kept for: every id of the shared
tokenizer (`top_k=None`, so KD_t is the exact KL(p_T || q_T)), or the teacher's top-k ids
at that position (`top_k=k`). Keeping the student's normaliser over the full vocab means
the mass it puts outside S is still penalised (it lowers every log q_i, i in S), and KD_t
with k equal to the vocab size is the full KL; it is >= 0 and zero only when the student
puts exactly p on S and nothing elsewhere. T² keeps the soft-target gradients on the scale
of CE's as T changes. Top-k is chosen on the raw teacher logits, so it does not depend on T,
and the cache below stays valid when alpha or T change.

Why a teacher cache is keyed by content: the trainer's batches are a pure function of
(seed, step), but a cache keyed by step would silently serve wrong logits after any change
of data, tokenizer, sampler or batch settings. Each cached row is instead filed under the
SHA-256 of its input ids, inside a folder named by the hash of everything else that decides
the teacher's output (teacher weights, top-k, vocab, device type, autocast dtype); the ids
are stored in the row file too and compared on read. So a hit is always the teacher's
output for exactly these tokens, and windows that repeat (a `sequential` sampler wrapping
around, re-runs with another alpha/T) reuse the teacher's work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from simplified_slm.errors import SLMError
from simplified_slm.models.base import CausalLM, next_token_loss
from simplified_slm.models.loading import ModelSource
from simplified_slm.tokenizers import Tokenizer, tokenizer_identity
from simplified_slm.training.config import TrainConfig
from simplified_slm.utils.io import atomic_write, atomic_write_json, sha256_file

IGNORE_INDEX = -100
CACHE_FORMAT = "simplified_slm.distill_cache/1"


class DistillLoss(NamedTuple):
    total: torch.Tensor  # what to backpropagate
    ce: torch.Tensor  # next-token cross-entropy, nats per token
    kd: torch.Tensor  # KD as defined in the module docstring (without alpha and T²), nats per token


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
                      teacher_ids: torch.Tensor | None = None, *, alpha: float,
                      temperature: float) -> DistillLoss:
    """`alpha * T² * KD + (1 - alpha) * CE` (see the module docstring).

    `student_logits` (B, T, V); `targets` (B, T) with -100 at ignored positions;
    `teacher_logits` (B, T, K): the teacher's logits for ids 0..K-1 (`teacher_ids` None,
    K <= V: ids past K, e.g. padding rows of a bigger embedding, are not in S), or for the
    ids in `teacher_ids` (B, T, K), e.g. its top-k.
    """
    k = teacher_logits.size(-1)
    if teacher_ids is None and k > student_logits.size(-1):
        raise ValueError(f"teacher logits cover {k} ids but the student's only {student_logits.size(-1)}")
    ce = next_token_loss(student_logits, targets)
    scaled = student_logits.float() / temperature
    log_norm = torch.logsumexp(scaled, dim=-1, keepdim=True)
    at_s = scaled[..., :k] if teacher_ids is None else scaled.gather(-1, teacher_ids.long())
    student_logp = at_s - log_norm
    teacher_logp = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    mask = targets != IGNORE_INDEX
    kd = torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / mask.sum().clamp(min=1)
    return DistillLoss(alpha * temperature ** 2 * kd + (1 - alpha) * ce, ce, kd)


# ------------------------------------------------------------------------ tokenizers
def _first_difference(student: dict[str, object], teacher: dict[str, object]) -> str:
    for name in [*student, *(k for k in teacher if k not in student)]:  # kind first, then size, ...
        ours, theirs = student.get(name), teacher.get(name)
        if ours == theirs:
            continue
        if name == "model" and isinstance(ours, dict) and isinstance(theirs, dict):
            vocab_a, vocab_b = ours.get("vocab") or {}, theirs.get("vocab") or {}
            moved = sum(vocab_b.get(tok) != i for tok, i in vocab_a.items())
            return (f"{moved} of the student's {len(vocab_a)} vocab entries have another id or are missing"
                    if moved else "same vocab, different merges or BPE settings")
        if name in ("kind", "vocab_size"):
            return f"{name} is {ours!r} for the student and {theirs!r} for the teacher"
        return f"their {name} differ"
    return "identical"


def check_same_tokenizer(student: Tokenizer, teacher: Tokenizer, teacher_path: str | Path) -> None:
    """Refuse a teacher whose ids mean other text: its distribution would be over the wrong tokens."""
    ours, theirs = tokenizer_identity(student), tokenizer_identity(teacher)
    if ours != theirs:
        raise SLMError(f"distillation teacher {teacher_path} uses another tokenizer than the student "
                       f"({_first_difference(ours, theirs)}); train the student with the teacher's tokenizer "
                       f"(tokenizer.kind=file, tokenizer.path=<the teacher's tokenizer folder or tokenizer.json>)")


# --------------------------------------------------------------------------- teacher
class Teacher:
    """A frozen model `models.load` reads (our checkpoint, model or packed folder, a
    transformers Llama / GPT-2 / BitNet folder or a Llama `.gguf` file), with its tokenizer.

    The tokenizer is read at once (to refuse a mismatch before training starts); the
    weights by `load_model`, so a run whose teacher logits are all cached never holds them.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        self.device = torch.device(device)
        try:
            self.source = ModelSource.open(self.path)
            self.tokenizer = self.source.tokenizer()
        except SLMError as err:
            raise SLMError(f"distillation teacher (train.distillation_teacher): {err}") from None
        self._model: CausalLM | None = None

    def load_model(self) -> CausalLM:
        """The teacher in eval mode with gradients off (loaded once, on first call)."""
        if self._model is None:
            self._model = self.source.model(self.tokenizer, self.device)
        return self._model

    def fingerprint(self) -> str:
        """SHA-256 over the files the weights come from (names and contents)."""
        files = self.source.weight_files()
        digest = hashlib.sha256()
        for path in files:
            try:
                digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
            except OSError as err:
                raise SLMError(f"cannot read the distillation teacher's {path}: {err.strerror}; "
                               "pass a complete model folder") from None
        return digest.hexdigest()


# ----------------------------------------------------------------------------- cache
class TeacherCache:
    """Top-k teacher logits on disk, one safetensors file per input window (see module docstring)."""

    def __init__(self, root: str | Path, key: dict[str, object]) -> None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(root) / digest
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / "key.json").is_file():
                atomic_write_json(self.dir / "key.json", key)  # for people; reads go by the folder name
        except OSError as err:
            raise SLMError(f"cannot create the teacher cache {self.dir}: {err.strerror}; "
                           "set train.distillation_cache_dir to a writable folder") from None

    def _file(self, ids: np.ndarray) -> Path:
        name = hashlib.sha256(ids.tobytes()).hexdigest()
        return self.dir / name[:2] / f"{name}.safetensors"

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, indices) of one window (T,) of ids, or None if absent or unreadable."""
        ids_np = ids.cpu().numpy().astype(np.int64)
        try:
            row = load_file(str(self._file(ids_np)))
        except (OSError, SafetensorError):  # absent, or damaged: recompute and overwrite
            return None
        stored = row.get("input_ids")
        if stored is None or not np.array_equal(stored.numpy(), ids_np) or "values" not in row or "indices" not in row:
            return None
        return row["values"], row["indices"].long()

    def put(self, ids: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        ids_np = ids.cpu().numpy().astype(np.int64)
        tensors = {"input_ids": torch.from_numpy(ids_np), "values": values.float().cpu().contiguous(),
                   "indices": indices.to(torch.int32).cpu().contiguous()}
        atomic_write(self._file(ids_np), lambda tmp: save_file(tensors, str(tmp)))


# ------------------------------------------------------------------------- distiller
class Distiller:
    """Teacher targets for the trainer's batches, from the teacher or the cache, and the loss."""

    def __init__(self, teacher: Teacher, vocab_size: int, *, alpha: float, temperature: float,
                 top_k: int | None = None, cache_dir: str | Path | None = None,
                 amp: torch.dtype | None = None) -> None:
        """`vocab_size`: the shared tokenizer's; `amp`: the teacher's autocast dtype (None = fp32)."""
        if top_k is not None and top_k > vocab_size:
            raise SLMError(f"train.distillation_top_k is {top_k} but the tokenizer has only {vocab_size} ids; "
                           "lower it or set it to null for the full vocab")
        if cache_dir is not None and top_k is None:
            raise SLMError("a teacher cache stores top-k logits; set train.distillation_top_k (e.g. 64)")
        self.teacher, self.vocab_size = teacher, vocab_size
        self.alpha, self.temperature, self.top_k, self.amp = alpha, temperature, top_k, amp
        self.cache = None
        if cache_dir is not None:
            key = {"format": CACHE_FORMAT, "teacher": teacher.fingerprint(), "top_k": top_k,
                   "vocab_size": vocab_size, "device": teacher.device.type, "amp": str(amp)}
            self.cache = TeacherCache(cache_dir, key)
        else:
            teacher.load_model()  # fail now rather than at the first step

    @classmethod
    def from_config(cls, tcfg: TrainConfig, student_tokenizer: Tokenizer, device: torch.device,
                    amp: torch.dtype | None) -> "Distiller":
        assert tcfg.distillation_teacher is not None, "TrainConfig.validate requires a teacher"
        teacher = Teacher(tcfg.distillation_teacher, device)
        check_same_tokenizer(student_tokenizer, teacher.tokenizer, teacher.path)
        return cls(teacher, student_tokenizer.vocab_size, alpha=tcfg.distillation_alpha,
                   temperature=tcfg.distillation_temperature, top_k=tcfg.distillation_top_k,
                   cache_dir=tcfg.distillation_cache_dir, amp=amp)

    @torch.no_grad()
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        model = self.teacher.load_model()
        if model.max_context is not None and x.size(1) > model.max_context:
            raise SLMError(f"train.block_size ({x.size(1)}) exceeds the distillation teacher's context "
                           f"({model.max_context}); lower block_size")
        x = x.to(self.teacher.device)
        with torch.autocast(self.teacher.device.type, dtype=self.amp, enabled=self.amp is not None):
            return model(x).logits[..., :self.vocab_size].float()

    def teacher_targets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, ids) for `distillation_loss`: full logits and None, or the top-k values and ids."""
        if self.top_k is None:
            return self._teacher_logits(x), None
        if self.cache is None:
            return self._teacher_logits(x).topk(self.top_k, dim=-1)
        found = {i: self.cache.get(row) for i, row in enumerate(x)}
        rows = {i: row for i, row in found.items() if row is not None}
        missing = [i for i in found if i not in rows]
        if missing:
            values, indices = self._teacher_logits(x[missing]).topk(self.top_k, dim=-1)
            for j, i in enumerate(missing):
                self.cache.put(x[i], values[j], indices[j])
                rows[i] = (values[j].cpu(), indices[j].cpu())
        order = range(len(x))
        return (torch.stack([rows[i][0] for i in order]).to(x.device),
                torch.stack([rows[i][1] for i in order]).to(x.device))

    def loss(self, student_logits: torch.Tensor, x: torch.Tensor, targets: torch.Tensor) -> DistillLoss:
        teacher_logits, teacher_ids = self.teacher_targets(x)
        return distillation_loss(student_logits, targets, teacher_logits, teacher_ids,
                                 alpha=self.alpha, temperature=self.temperature)
