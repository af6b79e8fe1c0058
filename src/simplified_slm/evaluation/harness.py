"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`slm harness`).

Published benchmark numbers mean lm-eval's task definitions, prompts and metrics, so we
run those rather than re-implement them: our models enter as the `slm` model type
(`harness_lm.SLMHarnessLM`) and `lm_eval.simple_evaluate` does the rest. lm_eval is an
optional extra, imported only here and on use, with a one-line fix when it is missing.

The package ships offline tasks in `simplified_slm/harness_tasks/` (tinystories_cloze,
tinystories_ppl, arith). Their YAMLs name their JSONL relative to their own folder, but
`datasets` resolves relative `data_files` against the working directory, so each run
copies the YAMLs into a temporary folder with the path made absolute and hands that folder
to lm-eval's `TaskManager` (plus any `include_path` of the user's); this works wherever
the package is installed. Standard lm-eval tasks (hellaswag, arc_easy, wikitext, ...) run
unchanged when their datasets are reachable (network or the HF cache).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

from simplified_slm.errors import SLMError

TASKS_DIR = Path(__file__).resolve().parent.parent / "harness_tasks"
LOCAL_TASKS = ("tinystories_cloze", "tinystories_ppl", "arith")


def require_lm_eval() -> None:
    """Raise the one-line install hint when lm-evaluation-harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SLMError("lm-evaluation-harness (lm_eval) is not installed; "
                       "pip install 'simplified-slm[eval]'") from None


def load_model(path: str, device: str) -> tuple[Any, Any]:
    """Model + tokenizer through the one loader (`simplified_slm.models.load`)."""
    from simplified_slm.models import load

    model, tokenizer, _ = load(path, device)
    return model, tokenizer


def write_local_tasks(directory: str | Path) -> Path:
    """Copy the shipped task YAMLs into `directory` with absolute `data_files`; return it."""
    directory = Path(directory)
    for source in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(source.read_text(encoding="utf-8"))
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(TASKS_DIR / name) for split, name in files.items()}
        (directory / source.name).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return directory


def harness_model(model_path: str | None = None, *, model: Any = None, tokenizer: Any = None,
                  batch_size: int = 8, device: str | None = None, max_length: int | None = None) -> Any:
    """An lm-eval `LM` for a saved model (`model_path`) or an in-memory model + tokenizer."""
    require_lm_eval()
    from simplified_slm.evaluation.harness_lm import SLMHarnessLM

    return SLMHarnessLM(model_path, model=model, tokenizer=tokenizer, batch_size=batch_size,
                        device=device, max_length=max_length)


def evaluate(lm: Any, tasks: Sequence[str], *, include_path: str | Sequence[str] | None = None,
             limit: int | float | None = None, num_fewshot: int | None = None, log_samples: bool = False,
             bootstrap_iters: int = 1000) -> dict[str, Any]:
    """Run lm-eval `tasks` on `lm` (ours from `harness_model`, or any lm-eval LM, e.g. `HFLM`).

    Returns lm-eval's result dict (`results[task][metric,filter]`, plus `samples` with
    per-request responses when `log_samples`). `bootstrap_iters` only sizes the standard
    errors of non-mean metrics (perplexities); lm-eval's CLI uses 100000, slow on a CPU.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise SLMError(f"no tasks given; name lm-eval tasks, e.g. --tasks {','.join(LOCAL_TASKS)}")
    extra = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in extra:
        if not Path(path).is_dir():
            raise SLMError(f"include_path {path} is not a folder; point it at a folder of task YAMLs")
    with tempfile.TemporaryDirectory(prefix="slm-harness-tasks-") as local:
        # indexing lm-eval's ~15k task YAMLs takes seconds; only the shipped tasks need none
        manager = TaskManager(include_path=[str(write_local_tasks(local)), *map(str, extra)],
                              include_defaults=not set(tasks) <= set(LOCAL_TASKS))
        unknown = [t for t in tasks if not manager.match_tasks([t])]
        if unknown:
            raise SLMError(f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks are "
                           f"{', '.join(LOCAL_TASKS)}, others come from lm-eval or --include_path")
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  task_manager=manager, log_samples=log_samples,
                                  bootstrap_iters=bootstrap_iters)
    return results


def results_json(results: dict[str, Any]) -> str:
    """lm-eval's result dict as JSON (its own fallback for values JSON cannot hold)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
