"""Distillation during fine-tuning: the loss against torch's own ``kl_div``, and the trainer's
``teacher`` pulling the student toward the teacher's distribution rather than the labels'."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from compressm_tune.data import Dataset
from compressm_tune.errors import ConfigError
from compressm_tune.models import SSMConfig, SSMModel
from compressm_tune.reduction import compress_pretrained
from compressm_tune.search import finetune_compressed
from compressm_tune.training import TrainConfig, Trainer, distill_loss
from compressm_tune.training.evaluation import training_memory_bytes

VOCAB = 12


@pytest.mark.parametrize("label_steps", [None, 5])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_distill_loss_is_cross_entropy_plus_torchs_kl_div(weight, label_steps):
    g = torch.Generator().manual_seed(0)
    out, teacher = torch.randn(2, 3, 9, 7, generator=g)  # (batch, L, C) each
    steps = label_steps or 9
    target = torch.randint(7, (3, steps), generator=g)
    student, tutor = out[:, -steps:].reshape(-1, 7), teacher[:, -steps:].reshape(-1, 7)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(tutor, -1), reduction="batchmean",
                  log_target=True)
    expected = (1 - weight) * F.cross_entropy(student, target.flatten()) + weight * kl
    got = distill_loss(out, teacher, target, weight)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-7)


def test_the_teacher_gets_no_gradient_and_its_own_distribution_costs_no_kl():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(2, 6, VOCAB, generator=g, requires_grad=True)
    target = torch.randint(VOCAB, (2, 6), generator=g)
    assert distill_loss(out, out, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    teacher = torch.randn(2, 6, VOCAB, generator=g, requires_grad=True)
    distill_loss(out, teacher, target, 0.5).backward()
    assert teacher.grad is None and out.grad.abs().sum() > 0


def _token_data(n: int = 96, length: int = 16) -> Dataset:
    """Random token ids whose labels are unrelated noise: nothing but a teacher can pull a
    student toward one particular next-token distribution."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(VOCAB, (n, length), generator=g)
    y = torch.randint(VOCAB, (n, length), generator=g)
    part = [slice(0, 64), slice(64, 80), slice(80, n)]
    return Dataset(name="tokens", task="classification", x_train=x[part[0]], y_train=y[part[0]],
                   x_val=x[part[1]], y_val=y[part[1]], x_test=x[part[2]], y_test=y[part[2]],
                   d_input=1, d_output=VOCAB, seq_len=length, norm_mean=[0.0], norm_std=[1.0],
                   info={})


def _teacher() -> SSMModel:
    torch.manual_seed(3)
    model = SSMModel(SSMConfig(arch="mamba2", d_output=VOCAB, d_model=8, state_dims=[8],
                               pooling="none", vocab_size=VOCAB, head_dim=4, dropout=0.0))
    with torch.no_grad():  # a peaked distribution, far from what noise labels teach
        model.head.weight.mul_(8.0)
    return model.eval()


def _kl_to(teacher: SSMModel, student: SSMModel, x: torch.Tensor) -> float:
    with torch.no_grad():
        t, s = F.log_softmax(teacher(x), -1), F.log_softmax(student(x), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_a_distilled_fine_tune_ends_closer_to_the_teacher(tmp_path):
    data, teacher = _token_data(), _teacher()
    cut = copy.deepcopy(teacher)
    compress_pretrained(cut, data.x_train[:16], keep=2)
    ends = {}
    for weight in (0.0, 1.0):
        student = copy.deepcopy(cut).train()
        cfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, eval_every=30, seed=0, threads=1)
        Trainer(student.config, cfg, data, tmp_path / str(weight), model=student,
                progress=False, teacher=copy.deepcopy(teacher),
                distill_weight=weight).fit()
        ends[weight] = _kl_to(teacher, student.eval(), data.x_test)
    assert ends[1.0] < 0.5 * ends[0.0], ends


def test_the_compress_fine_tune_distills_and_keeps_the_cut_widths():
    """``finetune_compressed`` (what ``compress --finetune-steps`` and the benchmark run) trains
    the cut model toward the teacher it is given, and returns it at its cut widths, ready to
    evaluate."""
    data, teacher = _token_data(), _teacher()
    cut = copy.deepcopy(teacher)
    compress_pretrained(cut, data.x_train[:16], keep=2)
    ends = {}
    for weight in (0.0, 1.0):
        tuned = finetune_compressed(copy.deepcopy(cut), data, 30, teacher=copy.deepcopy(teacher),
                                    distill=weight, lr=1e-2, batch_size=16, threads=1)
        assert tuned.state_dims == [2] and not tuned.training
        ends[weight] = _kl_to(teacher, tuned, data.x_test)
    assert ends[1.0] < 0.5 * ends[0.0], ends


def test_distillation_is_refused_where_it_means_nothing(tmp_path):
    data = _token_data()
    cfg = TrainConfig(steps=2, batch_size=16, threads=1)
    teacher = _teacher()
    with pytest.raises(ConfigError, match="weight in \\[0, 1\\]"):
        Trainer(teacher.config, cfg, data, tmp_path, model=copy.deepcopy(teacher),
                progress=False, teacher=teacher, distill_weight=1.5)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_the_memory_estimate_counts_the_teacher():
    c = _teacher().config
    assert training_memory_bytes(c, 16, 64, 1, teacher=c) > training_memory_bytes(c, 16, 64, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_graph_replayed_distilled_steps_match_eager_ones():
    """The teacher's forward is captured into the CUDA graph with the student's: replayed
    steps must update the student exactly as eager steps do."""
    from compressm_tune.training.optim import build_optimizer
    from compressm_tune.training.step import TrainStep

    teacher = _teacher().cuda()
    cuda = torch.device("cuda")
    calibration = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    runs = []
    for graphs in (False, True):
        student = copy.deepcopy(teacher)
        compress_pretrained(student, calibration.cuda(), keep=3)
        step = TrainStep(lambda out, y, t: distill_loss(out, t, y, 0.5), cuda, "fp32",
                         graphs=graphs, teacher=teacher)
        opt = build_optimizer(student, 1e-2, 0.05, 0.5, fused=True)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randint(VOCAB, (8, 16), generator=gen).cuda()
            step(student, opt, x, torch.randint(VOCAB, (8, 16), generator=gen).cuda())
        runs.append((student, step.captures))
    (eager, n_e), (graph, n_g) = runs
    assert n_e == 0 and n_g == 1
    for (name, a), b in zip(eager.state_dict().items(), graph.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
