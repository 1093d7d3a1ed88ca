"""SAF, MESA and SAM in the Hugging Face Trainer (:mod:`saf.huggingface`), each against an
oracle, on tiny randomly initialised BERT and GPT-2 classifiers (built from a config:
nothing is downloaded).

Oracles: the plain ``Trainer`` (lambda = 0 is it bit for bit); a run without evaluation
(evaluation leaves the store bitwise as it was); an uninterrupted run (a resumed run's
term, teacher and weights); the full batch (SAF under gradient accumulation); a plain
PyTorch SAM loop.
"""

import pytest
import torch

import saf

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
from saf.huggingface import STATE_FILE, SAFTrainer  # noqa: E402  (after the importorskip)

N, C, T = 16, 3, 8


def _model(kind: str = "bert"):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=50, n_positions=T, n_embd=16, n_layer=1, n_head=2, num_labels=C,
            pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        return transformers.GPT2ForSequenceClassification(cfg)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=T, num_labels=C,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _examples() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (N, T), generator=g)
    labels = torch.randint(0, C, (N,), generator=g).tolist()
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": y}
        for i, y in enumerate(labels)
    ]


def _args(out, epochs: int = 3, **kwargs):
    kwargs = {"per_device_train_batch_size": 4, "save_strategy": "no", "logging_strategy": "no",
              **kwargs}  # fmt: skip
    return transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, use_cpu=True, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
        learning_rate=1e-2, seed=0, **kwargs,
    )  # fmt: skip


class Recording(saf.SAFLoss):
    """SAFLoss that keeps each call's term."""

    terms: list

    def __call__(self, logits, idx, epoch):
        term = super().__call__(logits, idx, epoch)
        self.terms = [*getattr(self, "terms", []), (epoch, float(term.detach()))]
        return term


class RecordingMESA(saf.MESALoss):
    terms: list

    def __call__(self, logits, target):
        term = super().__call__(logits, target)
        self.terms = [*getattr(self, "terms", []), float(term.detach())]
        return term


def _trajectory(method: str, model, lam: float = 0.3):
    if method == "saf":
        return Recording(N, C, lam=lam, lag=1, start_epoch=1)
    return RecordingMESA(model, decay=0.5, lam=lam, start_epoch=1)


def _weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("method, kind", [("saf", "bert"), ("saf", "gpt2"), ("mesa", "bert")])
def test_lambda_0_is_the_plain_trainer_bit_for_bit(tmp_path, method, kind):
    data = saf.WithIndex(_examples())  # the plain Trainer drops "index" with the other columns
    plain = transformers.Trainer(_model(kind), _args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    model = _model(kind)
    ours = SAFTrainer(
        model, _args(tmp_path / "ours"), train_dataset=data,
        trajectory=_trajectory(method, model, lam=0.0),
    )  # fmt: skip
    ours.train()
    assert _equal(_weights(plain.model), _weights(ours.model))
    assert len(ours.trajectory.terms) == 3 * N // 4  # the term ran on every batch


def test_evaluation_never_touches_the_store(tmp_path):
    """Evaluating every step, on the training examples themselves (same indices), leaves the
    store and the weights bitwise as a run without evaluation."""
    data = saf.WithIndex(_examples())
    runs = []
    for evaluate in (False, True):
        model = _model()
        kwargs = {"eval_strategy": "steps", "eval_steps": 1} if evaluate else {}
        trainer = SAFTrainer(
            model, _args(tmp_path / str(evaluate), **kwargs), train_dataset=data,
            eval_dataset=data if evaluate else None, trajectory=_trajectory("saf", model),
        )  # fmt: skip
        trainer.train()
        runs.append(trainer)
    before = {k: v.clone() for k, v in runs[1].trajectory.state_dict().items() if k != "lag"}
    runs[1].evaluate()
    runs[1].predict(data)
    for trainer in runs:
        state = trainer.trajectory.state_dict()
        assert all(torch.equal(state[k], before[k]) for k in before)
    assert (before["epoch_of"] == 2).all()  # every row written, in the last epoch (of 0..2)
    assert _equal(_weights(runs[0].model), _weights(runs[1].model))


@pytest.mark.parametrize("method, step", [("saf", 8), ("mesa", 8), ("saf", 6)])
def test_a_resumed_run_has_the_uninterrupted_runs_term(tmp_path, method, step):
    """The regression: a resumed run's SAF term was silently 0 (no store in the checkpoint).
    Resumed at the end of epoch 1 (step 8 of 4 x 4) or inside it (step 6)."""
    data = saf.WithIndex(_examples())

    def trainer(out, **kwargs):
        model = _model()
        return SAFTrainer(
            model, _args(tmp_path / out, 4, **kwargs), train_dataset=data,
            trajectory=_trajectory(method, model),
        )  # fmt: skip

    whole = trainer("whole")
    whole.train()
    trainer("cut", max_steps=step, save_strategy="steps", save_steps=step).train()
    checkpoint = tmp_path / "cut" / f"checkpoint-{step}"
    assert (checkpoint / STATE_FILE).is_file()
    again = trainer("again", logging_strategy="epoch")
    again.train(resume_from_checkpoint=str(checkpoint))
    logged = [log["trajectory_loss"] for log in again.state.log_history if "loss" in log]
    assert logged and min(logged) > 0  # the logs show the term
    late = whole.trajectory.terms[step:]
    assert again.trajectory.terms == late and min(t[1] if method == "saf" else t for t in late) > 0
    assert _equal(_weights(whole.model), _weights(again.model))


def test_a_checkpoint_without_the_state_is_refused(tmp_path):
    data = saf.WithIndex(_examples())
    args = _args(tmp_path / "plain", 1, save_strategy="epoch")
    transformers.Trainer(_model(), args, train_dataset=data).train()
    ours = SAFTrainer(
        _model(), _args(tmp_path / "ours", 2), train_dataset=data,
        trajectory=_trajectory("saf", None),
    )  # fmt: skip
    with pytest.raises(ValueError, match=f"no {STATE_FILE}"):
        ours.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-4"))


def test_the_teacher_moves_once_per_optimizer_step(tmp_path):
    """Two micro-batches per step: one EMA update per step, with the weights after it."""
    model = _model()
    mesa = _trajectory("mesa", model)
    calls, update = [], mesa.update
    mesa.update = lambda m: calls.append(_weights(m)) or update(m)
    args = _args(tmp_path, 2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    trainer = SAFTrainer(model, args, train_dataset=_examples(), trajectory=mesa)
    trainer.train()
    assert len(calls) == trainer.state.global_step == 8
    assert _equal(calls[-1], _weights(model))


def _sum_over_accumulated_batch(outputs, labels, num_items_in_batch):
    logits = outputs["logits"]
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("scaled", [False, True])
def test_saf_under_accumulation_is_the_full_batch(tmp_path, scaled):
    """Two micro-batches of 2 take the step of one batch of 4: the term is scaled as the
    Trainer scales the model's loss, whether the Trainer divides it by the accumulation
    steps (``scaled=False``) or the loss is normalised over the accumulated batch."""
    data, runs = saf.WithIndex(_examples()), []
    for batch, steps in ((4, 1), (2, 2)):
        model = _model()
        # transformers 5 takes a model with **kwargs for one that normalises its loss by
        # num_items_in_batch; BERT's classifier does not (the plain Trainer's gradient is
        # then 2x under 2 accumulation steps), so say so, or normalise in compute_loss_func
        model.accepts_loss_kwargs = False
        args = _args(tmp_path / str(batch), 3, per_device_train_batch_size=batch,
                     gradient_accumulation_steps=steps, optim="sgd")  # fmt: skip
        loss = _sum_over_accumulated_batch if scaled else None
        trainer = SAFTrainer(
            model, args, train_dataset=data, trajectory=_trajectory("saf", model),
            compute_loss_func=loss,
        )  # fmt: skip
        trainer.train()
        runs.append(trainer)
    a, b = (_weights(r.model) for r in runs)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))
    assert sum(t for _, t in runs[1].trajectory.terms) > 0


def _plain_sam(rho: float, steps: int, bf16: bool = False) -> list[torch.Tensor]:
    model, batch = _model(), torch.utils.data.default_collate(_examples())
    opt = saf.SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=1e-2)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return _weights(model)


@pytest.mark.parametrize("bf16", [False, True])
def test_sam_takes_the_plain_loops_steps(tmp_path, bf16):
    """One batch of all 16 examples per step (the order within it changes only rounding)."""
    args = _args(tmp_path, 3, per_device_train_batch_size=N, optim="sgd", max_grad_norm=0.0,
                 bf16=bf16)  # fmt: skip
    trainer = SAFTrainer(_model(), args, train_dataset=_examples(), rho=0.5)
    trainer.train()
    ours, sam, sgd = _weights(trainer.model), _plain_sam(0.5, 3, bf16), _plain_sam(0.0, 3, bf16)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ours, sam, strict=True))
    assert not all(torch.allclose(x, y, atol=1e-4) for x, y in zip(ours, sgd, strict=True))


def test_a_missing_index_and_token_logits_are_refused(tmp_path):
    """One line each, at the first step: no silent store under the wrong rows."""
    no_index = SAFTrainer(
        _model(), _args(tmp_path / "a"), train_dataset=_examples(),
        trajectory=_trajectory("saf", None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="WithIndex"):
        no_index.train()
    lm = transformers.BertForMaskedLM(_model().config)
    tokens = [{**e, "labels": e["input_ids"]} for e in _examples()]
    per_token = SAFTrainer(
        lm, _args(tmp_path / "b"), train_dataset=saf.WithIndex(tokens),
        trajectory=_trajectory("saf", None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="sequence-classification head"):
        per_token.train()


def test_a_resumed_sam_run_is_the_uninterrupted_one(tmp_path):
    """SAM's base optimizer state (AdamW's moments) survives a Trainer checkpoint."""

    def trainer(out, epochs, **kwargs):
        args = _args(tmp_path / out, epochs, **kwargs)
        return SAFTrainer(_model(), args, train_dataset=_examples(), rho=0.05)

    whole = trainer("whole", 4)
    whole.train()
    trainer("cut", 2, save_strategy="epoch").train()
    again = trainer("again", 4)
    again.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-8"))
    assert _equal(_weights(whole.model), _weights(again.model))


@pytest.mark.parametrize(
    "kwargs, args, match",
    [
        ({"rho": 0.05}, {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=2"),
        ({"rho": 0.05, "trajectory": "saf"}, {}, "not both"),
        ({"trajectory": object()}, {}, "trajectory= takes"),
    ],
)
def test_silently_wrong_uses_are_refused(tmp_path, kwargs, args, match):
    if kwargs.get("trajectory") == "saf":
        kwargs["trajectory"] = _trajectory("saf", None)
    with pytest.raises(ValueError, match=match):
        SAFTrainer(_model(), _args(tmp_path, **args), train_dataset=_examples(), **kwargs)


def test_the_sharpness_callback_measures_without_changing_the_run(tmp_path):
    """A plain Trainer with SharpnessCallback: bitwise the run without it; every 4 steps a
    row whose lambda_max is the dense Hessian's top eigenvalue (float64 oracle)."""
    import pandas as pd
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from saf.huggingface import SharpnessCallback
    from tests.analysis._models import dense_hessian

    data = _examples()
    plain = transformers.Trainer(_model(), _args(tmp_path / "plain"), train_dataset=data)
    plain.train()
    ids = torch.stack([e["input_ids"] for e in data[:8]])
    probe = [({"input_ids": ids}, torch.tensor([e["labels"] for e in data[:8]]))]
    csv = tmp_path / "sharpness.csv"
    watched = transformers.Trainer(_model(), _args(tmp_path / "w"), train_dataset=data)
    watched.add_callback(SharpnessCallback(F.cross_entropy, probe, every=4, csv=csv, tol=1e-6))
    watched.train()
    assert _equal(_weights(plain.model), _weights(watched.model))
    rows = pd.read_csv(csv)
    assert list(rows.step) == [4, 8, 12] and rows.threshold.notna().all()
    model = watched.model.double().eval()
    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no forward-mode AD
        H = dense_hessian(_Logits(model), F.cross_entropy, [(ids, probe[0][1])])
    top = torch.linalg.eigvalsh(H)[-1]
    assert rows.lambda_1.iloc[-1] == pytest.approx(float(top), rel=1e-3)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits
