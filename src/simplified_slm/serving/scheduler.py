"""One thread owns the model and decodes every running request in a shared batch.

Between decode steps the scheduler admits waiting requests: their prompts are prefilled
together (left-padded) and their cache rows join the running batch (`batch_cache.join`),
so N concurrent clients share each forward pass. Finished, cancelled and timed-out rows
leave with `cache.reorder`. Each row samples from its own logits with its own
`torch.Generator` seeded from the request's `seed` (choice i of n uses seed + i), so a
row's tokens equal `slm generate`'s for the same prompt and seed whoever else is in the
batch. Groups whose caches cannot join (sliding-window layers, or a learned-position
model whose context the joined padding would overflow) run as separate batches stepped
in turn by the same loop.

Results go back through each request's `emit` callback (the app makes it thread-safe).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from simplified_slm.generation.generate import left_pad
from simplified_slm.generation.sampling import choose_next
from simplified_slm.serving.batch_cache import CannotJoin, join, trim_left
from simplified_slm.serving.protocol import APIError
from simplified_slm.serving.text import TextStream


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding settings (temperature 0 = greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Job:
    """One HTTP request: `prompts` x `n` choices; choice index = prompt index * n + i."""

    prompts: Sequence[list[int]]
    n: int
    sampling: Sampling
    emit: Callable[[tuple], None]
    deadline: float
    cancelled: bool = False
    open_choices: int = 0
    completion_tokens: int = 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    def fail(self, error: APIError) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.emit(("error", error))


@dataclass
class _Row:
    job: Job
    index: int
    prompt: list[int]
    text: TextStream
    generator: torch.Generator
    generated: int = 0

    @property
    def remaining(self) -> int:
        return self.job.sampling.max_tokens - self.generated


@dataclass
class _Batch:
    rows: list[_Row]
    cache: Any
    mask: torch.Tensor      # (rows, cache length) 1 = real token
    logits: torch.Tensor    # (rows, vocab) next-token logits not yet sampled
    padded: bool = True     # whether `mask` has a 0 (without, the model needs no mask at all)

    def __post_init__(self) -> None:
        self.padded = not bool(self.mask.all())

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        self.cache.reorder(index)
        self.mask, self.logits = self.mask.index_select(0, index), self.logits.index_select(0, index)
        padding = int((self.mask.cumsum(1) == 0).sum(1).min())  # slots that are padding in every row
        if padding:
            trim_left(self.cache, padding)
            self.mask = self.mask[:, padding:]
        self.padded = not bool(self.mask.all())


@dataclass
class Scheduler:
    """Owns `model`; `submit` queues a job, the background thread runs it."""

    model: Any
    tokenizer: Any
    max_batch: int = 8
    max_queue: int = 64
    _waiting: deque = field(default_factory=deque)
    _batches: list = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _draining: bool = False
    _stopping: bool = False
    _thread: threading.Thread | None = None
    _generated: int = 0  # tokens sampled since start, for /health

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slm-scheduler", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Stop admitting new jobs (running and queued ones continue)."""
        with self._cond:
            self._draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel whatever is left and end the thread."""
        with self._cond:
            self._draining = self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._draining:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._waiting) >= self.max_queue:
                raise APIError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                               type="rate_limit_error", code="queue_full")
            job.open_choices = job.rows
            self._waiting.append(job)
            self._cond.notify()

    def load(self) -> dict[str, int]:
        return {"running": sum(len(b.rows) for b in self._batches), "waiting": len(self._waiting),
                "generated_tokens": self._generated}

    # --- the model thread -------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._batches):
                        self._cond.wait()
                    if self._stopping:
                        break
                    jobs = self._take_jobs()
                if jobs:
                    self._guarded(jobs, lambda: self._admit(jobs))
                for batch in self._batches:
                    self._guarded([r.job for r in batch.rows], lambda: self._step(batch), batch)
                self._batches = [b for b in self._batches if b.rows]
        error = APIError(503, "the server shut down before the request finished", type="server_error")
        for job in [*self._waiting, *(r.job for b in self._batches for r in b.rows)]:
            job.fail(error)

    def _guarded(self, jobs: Sequence[Job], work: Callable[[], None], batch: _Batch | None = None) -> None:
        """A bug in one step fails its jobs with a 500 (traceback in the server log only)."""
        try:
            work()
        except Exception:
            traceback.print_exc()
            for job in jobs:
                job.fail(APIError(500, "internal error while generating; see the server log", type="server_error"))
            if batch is not None:
                batch.rows = []

    def _take_jobs(self) -> list[Job]:
        """Waiting jobs (first come, first served) that fit the free rows."""
        now = time.monotonic()
        for job in [j for j in self._waiting if j.cancelled or now > j.deadline]:
            self._waiting.remove(job)  # gone or expired, wherever it stands in the queue
            job.fail(APIError(504, "the request timed out while waiting", type="timeout"))
        free = self.max_batch - sum(len(b.rows) for b in self._batches)
        jobs = []
        while self._waiting:
            job = self._waiting[0]
            if job.rows > free:
                break
            free -= job.rows
            jobs.append(self._waiting.popleft())
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        rows = [self._new_row(job, p * job.n + i, prompt)
                for job in jobs for p, prompt in enumerate(job.prompts) for i in range(job.n)]
        for group in self._fit(rows):
            batch = self._prefill(group)
            for other in self._batches:
                if self._join(other, batch):
                    break
            else:
                self._batches.append(batch)

    def _new_row(self, job: Job, index: int, prompt: list[int]) -> _Row:
        generator = torch.Generator(device=self.model.device)
        if job.sampling.seed is None:
            generator.seed()
        else:
            generator.manual_seed(job.sampling.seed + index % job.n)
        return _Row(job, index, prompt, TextStream(self.tokenizer.decode, job.sampling.stop), generator)

    def _fit(self, rows: list[_Row]) -> list[list[_Row]]:
        """Split rows into prefill groups whose padded length fits the model's context."""
        limit, groups = self.model.max_context, []
        for row in rows:
            for group in groups:
                if limit is None or _slots([*group, row]) <= limit:
                    group.append(row)
                    break
            else:
                groups.append([row])
        return groups

    def _prefill(self, rows: list[_Row]) -> _Batch:
        ids, mask = left_pad([row.prompt for row in rows], device=self.model.device)
        cache = self.model.make_cache(len(rows), _slots(rows))
        out = self.model(ids, attention_mask=mask, cache=cache)
        return _Batch(rows, cache, mask, out.logits[:, -1])

    def _join(self, batch: _Batch, new: _Batch) -> bool:
        """Move `new`'s rows into `batch` when their caches can share it."""
        width = max(batch.mask.shape[1], new.mask.shape[1])
        rows = [*batch.rows, *new.rows]
        capacity = width + max(r.remaining for r in rows)
        limit = self.model.max_context
        if limit is not None and capacity > limit:
            return False
        try:
            cache = join(self.model, [(batch.cache, len(batch.rows)), (new.cache, len(new.rows))], capacity)
        except CannotJoin:
            return False
        mask = torch.zeros(len(rows), width, dtype=batch.mask.dtype, device=batch.mask.device)
        mask[:len(batch.rows), width - batch.mask.shape[1]:] = batch.mask
        mask[len(batch.rows):, width - new.mask.shape[1]:] = new.mask
        batch.rows, batch.cache, batch.mask = rows, cache, mask
        batch.logits = torch.cat([batch.logits, new.logits])
        batch.padded = not bool(mask.all())
        return True

    def _step(self, batch: _Batch) -> None:
        """Sample one token per row, retire finished rows, run one forward for the rest."""
        keep, tokens, now = [], [], time.monotonic()
        eos = self.tokenizer.eos_token_id
        for i, row in enumerate(batch.rows):
            job = row.job
            if not job.cancelled and now > job.deadline:
                job.fail(APIError(504, "the request timed out", type="timeout"))
            if job.cancelled:
                continue
            s = job.sampling
            token = int(choose_next(batch.logits[i:i + 1], greedy=s.temperature == 0.0, temperature=s.temperature,
                                    top_k=s.top_k or None, top_p=s.top_p, generator=row.generator)[0])
            row.generated += 1
            job.completion_tokens += 1
            self._generated += 1
            if token == eos:
                self._finish(row, row.text.flush(), "stop")
                continue
            delta, stopped = row.text.push(token)
            if stopped or row.remaining == 0:
                self._finish(row, delta + row.text.flush(), "stop" if stopped else "length")
                continue
            if delta:
                job.emit(("delta", row.index, delta))
            keep.append(i)
            tokens.append(token)
        if len(keep) != len(batch.rows):
            batch.select(keep)
        if not batch.rows:
            return
        column = torch.tensor(tokens, dtype=torch.long, device=batch.mask.device).unsqueeze(1)
        batch.mask = torch.cat([batch.mask, torch.ones_like(column)], dim=1)
        # no mask without padding: positions then count from the cache length, the same numbers
        mask = batch.mask if batch.padded else None
        batch.logits = self.model(column, attention_mask=mask, cache=batch.cache).logits[:, -1]

    def _finish(self, row: _Row, delta: str, reason: str) -> None:
        job = row.job
        job.emit(("finish", row.index, delta, reason))
        job.open_choices -= 1
        if job.open_choices == 0:
            job.emit(("done", job.completion_tokens))


def _slots(rows: Sequence[_Row]) -> int:
    """Cache slots a group needs: its longest prompt plus the longest output still to come."""
    return max(len(r.prompt) for r in rows) + max(r.remaining for r in rows)
