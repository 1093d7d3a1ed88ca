"""SAF, MESA and SAM in Lightning (:mod:`saf.lightning`), each against an oracle.

Oracles: a plain Lightning module without the term (lambda = 0 is SGD bit for bit); an
uninterrupted run (a resumed run's SAF term, MESA teacher and weights); a plain PyTorch
SAM loop (Lightning's automatic and manual optimization take the same steps).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import saf

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra")
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402  (after the importorskip)

from saf.lightning import SAFCallback  # noqa: E402

N, C = 48, 3


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, C))


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(N, 8, generator=g), torch.randint(0, C, (N,), generator=g))
    return DataLoader(saf.WithIndex(data), batch_size=12)  # fixed order: resumes line up


class Net(pl.LightningModule):
    def __init__(self, method: str = "sgd", lam: float = 0.3, manual: str | None = None):
        super().__init__()
        self.net, self.method, self.manual, self.terms = _mlp(), method, manual, []
        self.automatic_optimization = manual is None
        if method == "saf":
            self.extra = saf.SAFLoss(N, C, lam=lam, lag=1, start_epoch=1)
        elif method == "mesa":
            self.extra = saf.MESALoss(self.net, decay=0.5, lam=lam, start_epoch=1)

    def loss(self, batch):
        x, y, idx = batch
        target = self.extra.target(x, self.current_epoch) if self.method == "mesa" else None
        logits = self.net(x)
        term = torch.zeros(())
        if self.method == "saf":
            term = self.extra(logits, idx, self.current_epoch)
        elif self.method == "mesa":
            term = self.extra(logits, target)
        self.terms.append((self.current_epoch, float(term.detach())))
        return F.cross_entropy(logits, batch[1]) + term

    def training_step(self, batch, batch_idx):
        if self.manual is None:
            return self.loss(batch)
        opt = self.optimizers()
        if self.manual == "direct":  # the recipe that leaves global_step at 0
            self.manual_backward(self.loss(batch))
            opt.first_step(zero_grad=True)
            self.manual_backward(self.loss(batch))
            opt.second_step(zero_grad=True)
            return None
        if self.manual == "first_then_step":  # first_step, then the wrapper's step() ends it
            self.manual_backward(self.loss(batch))
            opt.first_step(zero_grad=True)
            self.manual_backward(self.loss(batch))
            opt.step()
            opt.zero_grad()
            return None
        if self.manual == "mismatched":  # two passes at w, one at w + eps: refused
            for _ in range(2):
                self.manual_backward(self.loss(batch))
            opt.first_step(zero_grad=True)
            self.manual_backward(self.loss(batch))
            opt.step()
            return None

        def closure():
            loss = self.loss(batch)
            self.manual_backward(loss)
            return loss

        opt.step(closure)  # SAM: two passes, and global_step advances

    def configure_optimizers(self):
        if self.method == "sam":
            return saf.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(model, root, epochs, callbacks=(), ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)],
        default_root_dir=root,
        **kwargs,
    )
    trainer.fit(model, _loader(), ckpt_path=ckpt_path)
    return trainer


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_import_saf_imports_no_framework():
    """Lightning and transformers stay optional: ``import saf`` loads neither."""
    import subprocess
    import sys

    code = "import sys, saf; print([m for m in ('lightning', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_lambda_0_is_plain_sgd_bit_for_bit(tmp_path, method):
    sgd, term = Net(), Net(method, lam=0.0)
    _fit(sgd, tmp_path / "sgd", 3)
    _fit(term, tmp_path / method, 3, [SAFCallback(term.extra, student=term.net)])
    assert _equal(_weights(sgd), _weights(term))


@pytest.mark.parametrize("method", ["saf", "mesa"])
def test_a_resumed_run_has_the_uninterrupted_runs_term(tmp_path, method):
    """The regression: after a resume the SAF term was 0.0 (the store was not saved)."""
    whole = Net(method)
    _fit(whole, tmp_path / "whole", 4, [SAFCallback(whole.extra, student=whole.net)])
    first = Net(method)
    _fit(first, tmp_path / "cut", 2, [SAFCallback(first.extra, student=first.net)])
    again = Net(method)  # a fresh process: new module, new store or teacher
    cb = SAFCallback(again.extra, student=again.net)
    _fit(again, tmp_path / "cut2", 4, [cb], ckpt_path=tmp_path / "cut" / "last.ckpt")
    late = [t for e, t in whole.terms if e >= 2]
    assert [t for e, t in again.terms] == late and min(late) > 0
    assert _equal(_weights(whole), _weights(again))


def test_a_checkpoint_without_the_store_is_refused(tmp_path):
    first = Net("saf")
    _fit(first, tmp_path / "cut", 2)  # no callback: the store is not in the checkpoint
    again = Net("saf")
    with pytest.raises(ValueError, match="no saf state"):
        _fit(again, tmp_path / "b", 4, [SAFCallback(again.extra)], tmp_path / "cut" / "last.ckpt")


def test_the_teacher_moves_once_per_optimizer_step_under_accumulation(tmp_path):
    """4 batches per epoch, 2 per step: 2 updates per epoch, after the step, not 4."""
    model = Net("mesa")
    calls, update = [], model.extra.update
    model.extra.update = lambda m: calls.append(_weights(m)) or update(m)
    cb = SAFCallback(model.extra, model.net)
    trainer = _fit(model, tmp_path, 2, [cb], accumulate_grad_batches=2)
    assert len(calls) == trainer.global_step == 4
    assert _equal(calls[-1], _weights(model.net))  # the weights after the last step


def _plain_sam(epochs: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    model = _mlp()
    opt = saf.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y, _ in _loader():

            def closure(x=x, y=y):
                opt.zero_grad()
                with torch.autocast("cpu", dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
    return _weights(model)


@pytest.mark.parametrize("manual", [None, "closure", "first_then_step"])
def test_sam_steps_as_a_plain_loop_and_checkpoints(tmp_path, manual):
    """Automatic optimization and the manual closure recipe: the plain loop's weights,
    ``global_step`` counts the steps, so checkpoints are written."""
    model = Net("sam", manual=manual)
    trainer = _fit(model, tmp_path, 2, [SAFCallback()])
    assert _equal(_weights(model), _plain_sam(2))
    assert trainer.global_step == 2 * 4 and (tmp_path / "last.ckpt").is_file()


def test_sam_under_bf16_mixed_is_the_plain_autocast_loop(tmp_path):
    model = Net("sam")
    _fit(model, tmp_path, 2, [SAFCallback()], precision="bf16-mixed")
    assert _equal(_weights(model), _plain_sam(2, torch.bfloat16))


def test_sam_mismatched_passes_are_refused_through_the_lightning_wrapper(tmp_path):
    """The pass count is shared with Lightning's optimizer wrapper (a copy of SAM's __dict__)."""
    with pytest.raises(ValueError, match="2 backward passes .* from 1"):
        _fit(Net("sam", manual="mismatched"), tmp_path, 1, [SAFCallback()])


def test_sam_stepped_without_global_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="global_step did not advance"):
        _fit(Net("sam", manual="direct"), tmp_path, 1, [SAFCallback()])


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("sam", {"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
        ("sam", {"plugins": [MixedPrecision("16-mixed", "cpu")]}, "GradScaler"),
        ("saf", {}, "SAF with SAM"),
    ],
)
def test_silently_wrong_sam_is_refused_at_fit_start(tmp_path, method, kwargs, match):
    model = Net(method)
    if method == "saf":
        model.configure_optimizers = lambda: saf.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss = model.extra if method == "saf" else None
    with pytest.raises(ValueError, match=match):
        _fit(model, tmp_path, 1, [SAFCallback(loss)], **kwargs)
    assert model.terms == []  # refused before any step


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_the_sharpness_callback_measures_without_changing_the_run(tmp_path, method):
    """Bitwise the run without it; every 2 optimizer steps a row whose lambda_max is the
    dense float64 Hessian's top eigenvalue, beside the threshold read from the optimizer."""
    import pandas as pd

    from saf.lightning import SharpnessCallback
    from tests.analysis._models import dense_hessian

    plain = Net(method)
    _fit(plain, tmp_path / "plain", 1, [SAFCallback()])
    x, y, _ = next(iter(_loader()))
    csv = tmp_path / "sharpness.csv"
    cb = SharpnessCallback(F.cross_entropy, [(x, y)], every=2, module="net", csv=csv, tol=1e-8)
    watched = Net(method)
    _fit(watched, tmp_path / "w", 1, [SAFCallback(), cb])
    assert _equal(_weights(plain), _weights(watched))
    rows = pd.read_csv(csv)
    assert list(rows.step) == [2, 4] and rows.threshold.iloc[0] == pytest.approx(2 * 1.9 / 0.1)
    if method == "sam":
        assert rows.sam_edge.notna().all()
    H = dense_hessian(watched.net.double(), F.cross_entropy, [(x.double(), y)])
    assert rows.lambda_1.iloc[-1] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-6)
