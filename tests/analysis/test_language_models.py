"""Language models: the token losses (``lm``, ``token_ce``) against all tokens at once and a
dense float64 Hessian; errors that name the real problem; compiled factories; flags that
cannot fit the data refused before any work."""

import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh
from torch import nn
from torch.func import functional_call, hessian

from analysis import analyze_run, check_loss, hessian_eigenvalues
from analysis.batches import batch_mean, sample_losses
from analysis.io import uncompiled
from analysis.losses import TokenCrossEntropy, loss_function
from cli import main

V, D = 7, 3


class TinyLM(nn.Module):
    """Embedding then a linear read-out: ``(batch, seq)`` ids to ``(batch, seq, vocab)``."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(V, D), nn.Linear(D, V)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids)))


def tiny_lm():
    torch.manual_seed(0)
    return TinyLM().double()


def ragged_batches():
    """Batches of different lengths and padding (-100): rows and tokens weigh differently."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n, t, pad in ((3, 6, 2), (1, 4, 0), (2, 5, 3)):
        ids = torch.randint(0, V, (n, t), generator=g)
        labels = ids.clone()
        labels[0, t - pad :] = -100
        out.append((ids, labels))
    return out


def _all_at_once(model, batches, shift=True):
    """The oracle: cross-entropy over every counted token of every batch in one call."""
    s = 1 if shift else 0
    z = torch.cat([model(x)[:, : x.shape[1] - s].reshape(-1, V) for x, _ in batches])
    y = torch.cat([y[:, s:].reshape(-1) for _, y in batches])
    return F.cross_entropy(z, y, ignore_index=-100)


@pytest.mark.parametrize("name, shift", [("lm", True), ("token_ce", False)])
def test_mean_over_batches_is_the_mean_over_all_tokens(name, shift):
    model, data, loss = tiny_lm(), ragged_batches(), loss_function(name)
    with torch.no_grad():
        got = batch_mean(lambda b: loss(model(b[0]), b[1]), data, loss_fn=loss)
        want = _all_at_once(model, data, shift)
        rows = batch_mean(lambda b: loss(model(b[0]), b[1]), data)  # weighted by sequences
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert abs(float(rows) - float(want)) > 1e-3  # the data tells the two weightings apart


def test_analyze_run_loss_and_accuracy_rows_are_token_means(tmp_path):
    torch.save(tiny_lm().state_dict(), tmp_path / "step_3.pt")
    df = analyze_run(tmp_path, ["loss", "accuracy"], model_factory=tiny_lm,
                     data=ragged_batches(), loss_fn="lm", out=False, progress=False)  # fmt: skip
    model = tiny_lm()
    with torch.no_grad():
        want = float(_all_at_once(model, ragged_batches()))
        z = torch.cat([model(x)[:, :-1].reshape(-1, V) for x, _ in ragged_batches()])
    y = torch.cat([y[:, 1:].reshape(-1) for _, y in ragged_batches()])
    hits = (z.argmax(1) == y)[y != -100].double().mean()
    assert df.value.tolist() == pytest.approx([want, float(hits)], rel=1e-12)
    assert df.step.tolist() == [3, 3]


def test_lambda_max_of_the_lm_loss_matches_eigsh_on_the_dense_hessian():
    model, data = tiny_lm(), ragged_batches()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_at(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return _all_at_once(lambda x: functional_call(model, params, (x,)), data)

    H = hessian(loss_at)(theta).numpy()
    want = eigsh(H, k=2, which="LA", return_eigenvectors=False)[::-1]
    got = hessian_eigenvalues(model, loss_function("lm"), data, k=2, tol=1e-10)
    np.testing.assert_allclose(got.values.numpy(), want, rtol=1e-8)
    by_rows = hessian_eigenvalues(model, lambda z, y: loss_function("lm")(z, y), data, k=1)
    assert abs(float(by_rows.values[0]) - want[0]) > 1e-3 * want[0]  # weighting matters


def test_per_token_losses_average_to_the_batch_loss():
    model, (x, y) = tiny_lm(), ragged_batches()[0]
    lm = TokenCrossEntropy()
    with torch.no_grad():
        per = sample_losses(lm, model(x), y)
        assert per.numel() == lm.count_terms(y) == 3 * 5 - 2
        assert float(per.mean()) == pytest.approx(float(lm(model(x), y)), rel=1e-12)


def test_labels_ignored_and_out_of_range():
    out = torch.zeros(2, 4, V)
    check_loss(loss_function("lm"), out, torch.tensor([[1, 2, -100, -100], [0, 1, 2, 3]]))
    check_loss(F.cross_entropy, torch.zeros(3, 5), torch.tensor([0, -100, 4]))  # ce ignores too
    with pytest.raises(ValueError, match=r"lm: labels must lie in 0..6 .or be -100: ignored. "
                                         r"for a vocabulary of 7, got 0..7"):  # fmt: skip
        check_loss(loss_function("lm"), out, torch.tensor([[0, 1, 2, 3], [0, 1, 2, 7]]))
    with pytest.raises(ValueError, match="lm needs .batch, seq, vocab. logits"):
        check_loss(loss_function("lm"), torch.zeros(2, V), torch.tensor([1, 2]))


def test_cross_entropy_on_per_token_logits_says_use_lm():
    with pytest.raises(ValueError, match=r"per-token logits .2, 16, 50. .* use --loss lm"):
        check_loss(F.cross_entropy, torch.zeros(2, 16, 50), torch.zeros(2, 16, dtype=torch.long))
    check_loss(F.cross_entropy, torch.zeros(2, 5, 9), torch.zeros(2, 9, dtype=torch.long))  # C=5


def test_a_compiled_factory_is_measured_as_its_module(tmp_path):
    torch.save(tiny_lm().state_dict(), tmp_path / "a.pt")
    kw = dict(data=ragged_batches(), loss_fn="lm", out=False, progress=False)
    plain = analyze_run(tmp_path, ["loss", "lambda_max"], model_factory=tiny_lm, **kw)
    compiled = analyze_run(tmp_path, ["loss", "lambda_max"],
                           model_factory=lambda: torch.compile(tiny_lm()), **kw)  # fmt: skip
    assert compiled.value.tolist() == plain.value.tolist()
    assert (compiled.status == "ok").all()
    fake = type("OptimizedModule", (nn.Module,), {})()
    with pytest.raises(ValueError, match="return the module itself from the factory"):
        uncompiled(fake)


def small_net():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # 43 parameters


def batches_64():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(2)]  # fmt: skip


def gpt2():
    from tests.analysis import _lm

    return _lm.gpt2()


def gpt2_batches():
    from tests.analysis import _lm

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _lm.VOCAB, (2, 16 // 2), generator=g)
    return [({"input_ids": ids}, ids)]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    m = types.ModuleType("lmcli")
    m.small_net, m.batches_64, m.gpt2, m.gpt2_batches = small_net, batches_64, gpt2, gpt2_batches
    monkeypatch.setitem(sys.modules, "lmcli", m)
    torch.save(small_net().state_dict(), tmp_path / "epoch_1.pt")
    return tmp_path


def _one_line_exit_2(capsys, folder, *argv):
    out = folder / "t.csv"
    code = main(["analyze", str(folder), "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists(), err
    return err[0]


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--metrics", "m_sharpness", "--m", "128"], "m=128 (--m) is more than the 64 samples"),
        (["--metrics", "lambda_44"], "lambda_44 asks for 44 eigenvalues of a model with 43"),
        (["--lambda-se", "4"], "got 2; return more batches from --data lmcli:batches_64"),
    ],
)
def test_flags_that_cannot_fit_are_one_line_before_any_work(folder, capsys, extra, match):
    argv = ["--model", "lmcli:small_net", "--data", "lmcli:batches_64", *extra]
    assert match in _one_line_exit_2(capsys, folder, *argv)


def test_gpt2_with_ce_names_the_lm_loss(folder, capsys):
    pytest.importorskip("transformers")
    torch.save(gpt2().state_dict(), folder / "epoch_1.pt")
    argv = ["--model", "lmcli:gpt2", "--data", "lmcli:gpt2_batches", "--loss", "ce"]
    line = _one_line_exit_2(capsys, folder, *argv)
    assert "per-token logits (2, 8, 50)" in line and "use --loss lm" in line
    assert main(["analyze", str(folder), "--out", str(folder / "t.csv"), "--no-progress",
                 *argv[:-1], "lm", "--metrics", "loss"]) == 0  # fmt: skip
    assert pd.read_csv(folder / "t.csv").status.tolist() == ["ok"]


def padded_with_minus_one():
    return [(x, torch.where(y == -100, -1, y)) for x, y in ragged_batches()]


def test_ignore_index_from_the_command_line(tmp_path, monkeypatch, capsys):
    m = types.ModuleType("lmpad")
    m.tiny_lm, m.padded = tiny_lm, padded_with_minus_one
    monkeypatch.setitem(sys.modules, "lmpad", m)
    torch.save(tiny_lm().state_dict(), tmp_path / "step_1.pt")
    argv = ["--model", "lmpad:tiny_lm", "--data", "lmpad:padded", "--metrics", "loss"]
    line = _one_line_exit_2(capsys, tmp_path, *argv, "--loss", "lm")
    assert "lm: labels must lie in 0..6 (or be -100: ignored)" in line and "got -1..6" in line
    line = _one_line_exit_2(capsys, tmp_path, *argv, "--ignore-index", "-1")
    assert "--ignore-index applies to --loss lm and token_ce, not ce" in line
    out = tmp_path / "t.csv"
    code = main(["analyze", str(tmp_path), *argv, "--loss", "lm", "--ignore-index", "-1",
                 "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    with torch.no_grad():
        want = float(_all_at_once(tiny_lm(), ragged_batches()))
    assert pd.read_csv(out).value.item() == pytest.approx(want, rel=1e-12)
