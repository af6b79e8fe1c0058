"""Our models as an lm-evaluation-harness model type (`slm`), for every family.

lm-eval's `TemplateLM` supplies the context/continuation split (`_encode_pair`: encode the
whole text, cut at the context's token count, as its `hf` model does), so per-request
scores match the harness's `hf` model on the same weights. What is ours: scoring batches
sorted by length (lm-eval's `Collator`) and right-padded without a mask (exact for causal
models, recurrent ones included), with only the continuation positions through the output
head, and a context shared by several requests run once through the model's cache;
rolling windows from lm-eval's own utilities; generation with the model's cached `generate`
and stop strings checked after each token. This module imports lm_eval at the top: reach it
through `simplified_slm.evaluation.harness`, which says how to install it when missing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm import tqdm

from simplified_slm.errors import SLMError
from simplified_slm.generation.generate import left_pad
from simplified_slm.models.base import CausalLM
from simplified_slm.tokenizers import Tokenizer

# Window for rolling log-likelihood and the context cut for models without a fixed one
# (recurrent families, RoPE models without a trained length): lm-eval's `hf` default.
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256


def model_max_length(model: CausalLM) -> int:
    """The model's context, else the length it was trained for, else DEFAULT_MAX_LENGTH."""
    return model.max_context or getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH


def right_pad(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token rows right-padded (with 0) to the longest, as lm-eval's `hf` model batches them."""
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return ids.to(device)


def continuation_index(lengths: list[int], spans: list[int], device: torch.device) -> torch.Tensor:
    """(rows, max span) positions whose logits score each row's continuation.

    Row i's continuation is predicted by its last `spans[i]` positions before
    `lengths[i]`; they are right-aligned so `[-span:]` picks them, and shorter spans repeat
    their first position on the left (computed, never read).
    """
    width = max(spans)
    offsets = torch.arange(width) - width
    index = torch.stack([(length + offsets).clamp(min=length - span) for length, span in zip(lengths, spans)])
    return index.to(device)


@contextmanager
def scored_positions(model: CausalLM, index: torch.Tensor) -> Iterator[None]:
    """Within the block, `model`'s output head sees only the hidden states at `index`.

    Scoring needs the logits of the continuation positions only, and the head (49152 x 576
    for SmolLM2) costs a fifth of the model per position: picking the rows before it skips
    that work for every context position. Every family ends in `lm_head` applied position by
    position (BitLinear's activation scale is per token too), so a pre-hook on it is enough.
    """
    def pick(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden = args[0]
        return (hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])),)

    handle = model.lm_head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def continuation_score(logits: torch.Tensor, normalisers: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
    """(log-likelihood, greedy) of `continuation` from the logits that predict it, one row each.

    A log-prob is the logit minus the position's float32 logsumexp (`normalisers`, float64),
    subtracted and summed in float64: a float32 log-softmax rounds its outputs with a bias
    (~1e-6 per token measured), which ~500-token stories sum to ~1e-3; a float64
    log-softmax is as exact but 3.5x the cost on CPU.
    """
    target = torch.tensor(continuation, dtype=torch.long, device=logits.device)
    logprobs = logits.gather(1, target[:, None])[:, 0].double() - normalisers
    return float(logprobs.sum()), bool((logits.argmax(-1) == target).all())


@register_model("slm")
class SLMHarnessLM(TemplateLM):
    """A saved model (`pretrained=PATH`, so `simple_evaluate(model="slm", model_args="pretrained=...")`
    works once this module is imported) or an in-memory `model` + `tokenizer`."""

    def __init__(self, pretrained: str | None = None, *, model: CausalLM | None = None,
                 tokenizer: Tokenizer | None = None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 device: str | None = None, max_batch_size: int | None = None) -> None:
        # max_batch_size: lm-eval hands it to every model type; batches here have a fixed size
        super().__init__()
        if model is None:
            if pretrained is None:
                raise SLMError("the slm harness model needs a model: pass pretrained=PATH (a checkpoint "
                               "or model folder)")
            from simplified_slm.evaluation.harness import load_model

            model, tokenizer = load_model(pretrained, device or "auto")
        elif tokenizer is None:
            raise SLMError("SLMHarnessLM got a model without its tokenizer; pass tokenizer=...")
        elif device is not None:
            from simplified_slm.models.loading import resolve_device

            model = model.to(resolve_device(device))
        try:
            self._batch_size = int(batch_size)
        except ValueError:
            raise SLMError(f"batch_size must be a whole number for the slm model, got {batch_size!r}") from None
        if self._batch_size < 1:
            raise SLMError(f"batch_size must be at least 1, got {self._batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model_max_length(model))
        self.max_gen_toks = int(max_gen_toks)

    # --- ids -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.prefix_token_id if self.tokenizer.eos_token_id is None else self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """BOS, else EOS (as lm-eval's `hf` model), else a newline: tokenizers without special
        ids (byte, char) separate documents with newlines in our corpora."""
        for candidate in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return (self.tokenizer.encode_ids("\n") or [0])[0]

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode_ids(string)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _left_padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(rows, self.eot_token_id, self.device)

    # --- scoring ---------------------------------------------------------------------
    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, share_contexts: bool = True) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, continuation is the greedy choice) per request.

        Requests whose context several requests share (multiple-choice answers) run that
        context once (`_score_shared_contexts`); the rest run whole (`_score_whole`).
        `share_contexts=False` for rolling windows, whose contexts are never worth sharing.
        """
        longest = max((len(cont) for _, _, cont in requests), default=0)
        if longest > self.max_length:
            raise SLMError(f"a continuation has {longest} tokens but the model sees at most {self.max_length}; "
                           "evaluate this task with a longer-context model (or a coarser tokenizer)")
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if share_contexts and len(ctx) + len(cont) - 1 <= self.max_length:  # no cut from the left
                by_context.setdefault(tuple(ctx), []).append(i)
        groups = [members for members in by_context.values() if len(members) > 1]
        shared = {i for members in groups for i in members}
        alone = [i for i in range(len(requests)) if i not in shared]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="slm loglikelihood")
        scored = [*zip(alone, self._score_whole([requests[i] for i in alone], progress)),
                  *self._score_shared_contexts(requests, groups, progress)]
        for i, answer in scored:
            results[i] = answer
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        progress.close()
        return results

    def _score_whole(self, requests: list[tuple[Any, list[int], list[int]]], progress: tqdm) -> list[tuple[float, bool]]:
        """Each request's context + continuation in one forward.

        Batches are right-padded without a mask: every family is causal, so padding after a
        row's last token cannot change its scores, and attention keeps its unmasked causal
        kernel. Only the continuation positions reach the output head (`scored_positions`).
        Requests whose input (context + continuation minus its last token) is the same run
        once (lm-eval's `Collator` "contexts" grouping, as its `hf` model does).
        """
        order = Collator(requests, sort_fn=lambda r: (-len(r[1]) - len(r[2]), tuple(r[1] + r[2])),
                         group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        results = []
        for chunk in order.get_batched(n=self._batch_size):
            # the last token is only predicted; cut from the left beyond the context
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            index = continuation_index([len(r) for r in rows], [len(cont) for _, _, cont in chunk], self.device)
            with scored_positions(self.model, index):
                logits = self.model(right_pad(rows, self.device)).logits.float()
            normalisers = logits.logsumexp(-1).double()
            for (request, ctx, cont), row_logits, row_normalisers in zip(chunk, logits, normalisers):
                # requests sharing this input differ in their last token only
                for _, cont, shared in order.get_cache(req_str=request, cxt_toks=ctx, cont_toks=cont,
                                                       logits=row_logits[None]):
                    results.append(continuation_score(shared[0, -len(cont):], row_normalisers[-len(cont):], cont))
                    progress.update(1)
        return order.get_original(results)

    def _score_shared_contexts(self, requests: list[tuple[Any, list[int], list[int]]], groups: list[list[int]],
                               progress: tqdm) -> Iterator[tuple[int, tuple[float, bool]]]:
        """(request index, score) for requests grouped by a shared context.

        A batch of up to `batch_size` contexts (longest first) is left-padded and run once
        with the model's cache; the cache rows are repeated per continuation (`reorder`, which
        every family's cache has) and all their continuations run after them, right-padded.
        For a 4-way multiple choice this runs each context once instead of four times. A
        batch's longest context plus its longest continuation stays within `max_length`.
        """
        def longest_continuation(members: list[int]) -> int:
            return max(len(requests[i][2]) for i in members) - 1

        groups = sorted(groups, key=lambda members: -len(requests[members[0]][1]))
        batch: list[list[int]] = []
        for members in groups:
            width = len(requests[(batch or [members])[0][0]][1]) + max(map(longest_continuation, [*batch, members]))
            if batch and (len(batch) == self._batch_size or width > self.max_length):
                yield from self._score_context_batch(requests, batch, progress)
                batch = []
            batch.append(members)
        if batch:
            yield from self._score_context_batch(requests, batch, progress)

    def _score_context_batch(self, requests: list[tuple[Any, list[int], list[int]]], groups: list[list[int]],
                             progress: tqdm) -> Iterator[tuple[int, tuple[float, bool]]]:
        ids, mask = self._left_padded([requests[members[0]][1] for members in groups])
        members = [i for group in groups for i in group]
        owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=self.device)
        continuations = [requests[i][2] for i in members]
        width = max(map(len, continuations)) - 1  # the last token is only predicted
        cache = self.model.make_cache(len(groups), ids.shape[1] + max(width, 1))
        last = torch.full((len(groups), 1), ids.shape[1] - 1, device=self.device)
        with scored_positions(self.model, last):  # the context's last position predicts token 1
            out = self.model(ids, attention_mask=mask, cache=cache, use_cache=True)
        logits = out.logits.float().index_select(0, owner)
        if width:
            out.cache.reorder(owner)
            mask = torch.cat([mask.index_select(0, owner), mask.new_ones(len(members), width)], dim=1)
            rest = self.model(right_pad([c[:-1] for c in continuations], self.device), attention_mask=mask,
                              cache=out.cache, use_cache=True).logits.float()
            logits = torch.cat([logits, rest], dim=1)
        normalisers = logits.logsumexp(-1).double()
        for i, cont, row_logits, row_normalisers in zip(members, continuations, logits, normalisers):
            yield i, continuation_score(row_logits[:len(cont)], row_normalisers[:len(cont)], cont)
            progress.update(1)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of `max_length` (lm-eval's scheme)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(index)
        totals = [0.0] * len(requests)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, share_contexts=False)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations cut at the first stop string."""
        order = Collator([req.args for req in requests], group_by="gen_kwargs", group_fn=lambda r: r[1],
                         sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]))
        eos = self.tokenizer.eos_token_id
        eos_text = None if eos is None else self.tokenizer.decode([eos])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="slm generate_until")
        for chunk in order.get_batched(n=self._batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new_tokens = int(kwargs.pop("max_gen_toks"))
            budget = self.max_length - new_tokens if self.max_length > new_tokens else self.max_length
            ids, mask = self._left_padded([self.tok_encode(c)[-budget:] for c in contexts])
            prompt_len = ids.shape[1]

            def stopped(so_far: torch.Tensor) -> bool:
                texts = (self.tokenizer.decode(row) for row in so_far[:, prompt_len:].tolist())
                return all(any(stop in text for stop in until) for text in texts)

            out = self.model.generate(ids, new_tokens, attention_mask=mask, greedy=not kwargs.get("do_sample"),
                                      temperature=float(kwargs.get("temperature") or 1.0),
                                      top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                                      eos_token_id=eos, stop_when=stopped)
            for context, gen_kwargs, row in zip(contexts, all_kwargs, out[:, prompt_len:].tolist()):
                text = postprocess_generated_text(generation=self.tokenizer.decode(row), stop=until,
                                                  think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                progress.update(1)
        progress.close()
        return order.get_original(results)
