"""Checkpoint layouts users really have: Hugging Face ``save_pretrained`` and Trainer
``checkpoint-N/`` folders (tied weights, ``pytorch_model.bin``, shards), timm's ``.pth.tar``
with an ``argparse.Namespace``, a LightningModule's ``self.net``, names by step."""

import json
import sys
import types

import pandas as pd
import pytest
import torch
from torch import nn

from analysis import analyze_run, find_checkpoints, load_checkpoint
from analysis.io import CheckpointError, checkpoint_step, load_state_dict, safe_torch_load
from cli import main
from tests.analysis import _lm


def tiny():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def tiny_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(10, 4, generator=g), torch.randint(0, 3, (10,), generator=g))]


@pytest.fixture
def mod(monkeypatch):
    """The factories as a module ``--model``/``--data`` can name."""
    m = types.ModuleType("layoutmod")
    m.gpt2, m.token_batches = _lm.gpt2, _lm.token_batches
    m.tiny, m.tiny_batches = tiny, tiny_batches
    monkeypatch.setitem(sys.modules, "layoutmod", m)
    return "layoutmod"


def _analyze(folder, out, mod, model, data, *extra):
    argv = ["analyze", str(folder), "--model", f"{mod}:{model}", "--data", f"{mod}:{data}",
            "--out", str(out), "--no-progress", *extra]  # fmt: skip
    return main(argv)


def _surface(target, out, mod, model, data, *extra):
    argv = ["surface", str(target), "--model", f"{mod}:{model}", "--data", f"{mod}:{data}",
            "--dim", "1", "--grid", "-1:1:3", "--no-plots", "--no-progress", "--out", str(out),
            *extra]  # fmt: skip
    return main(argv)


def test_save_pretrained_folders_of_a_tied_gpt2_in_step_order(tmp_path, mod, capsys):
    folder = _lm.save_pretrained_folders(tmp_path / "hf")
    out = tmp_path / "t.csv"
    lm = ("--loss", "lm")
    code = _analyze(folder, out, mod, "gpt2", "token_batches", *lm, "--metrics", "loss,lambda_max",
                    "--tol", "1e-3")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    df = pd.read_csv(out)
    assert (df.status == "ok").all() and len(df) == 3 * 2
    assert df.checkpoint.unique().tolist() == ["gpt2-step2", "gpt2-step10", "gpt2-step100"]
    assert df.step.unique().tolist() == [2, 10, 100] and df.epoch.isna().all()
    # the oracle: the model saved, evaluated directly (the tied head loaded from wte)
    loss = df[(df.metric == "loss") & (df.step == 10)].value.item()
    assert loss == pytest.approx(_lm.lm_loss(_lm.gpt2(seed=10), _lm.token_batches()), rel=1e-6)
    assert _surface(folder, tmp_path / "s", mod, "gpt2", "token_batches", *lm) == 0


def test_trainer_checkpoint_folders_ignore_the_optimizer_files(tmp_path, mod, capsys):
    folder = _lm.trainer_folders(tmp_path / "out")
    assert (folder / "checkpoint-5" / "pytorch_model.bin").is_file()
    assert len(list((folder / "checkpoint-100").glob("model-*-of-*.safetensors"))) > 1
    out = tmp_path / "t.csv"
    assert _analyze(folder, out, mod, "gpt2", "token_batches", "--loss", "lm",
                    "--metrics", "loss") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "skipped" not in err and "optimizer" not in err
    df = pd.read_csv(out)
    assert df.checkpoint.tolist() == ["checkpoint-5", "checkpoint-20", "checkpoint-100"]
    assert df.step.tolist() == [5, 20, 100] and (df.status == "ok").all()
    for s, loss in zip(df.step, df.value, strict=True):  # bin, safetensors, shards alike
        assert loss == pytest.approx(_lm.lm_loss(_lm.gpt2(seed=s), _lm.token_batches()), rel=1e-6)
    assert _surface(folder, tmp_path / "s", mod, "gpt2", "token_batches", "--loss", "lm") == 0
    # one Trainer folder given itself is one checkpoint; its optimizer.pt is not another
    assert [p.name for _, p in find_checkpoints(folder / "checkpoint-5")] == ["checkpoint-5"]
    # the Trainer's final save_pretrained beside its checkpoint-N/ folders comes last
    _lm.gpt2(seed=7).save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"not read")
    found = [p.name for _, p in find_checkpoints(folder)]
    assert found == ["checkpoint-5", "checkpoint-20", "checkpoint-100", "out"]


def test_timm_pth_tar_with_an_argparse_namespace_is_read_as_data(tmp_path, mod, capsys):
    folder = _lm.timm_files(tmp_path / "timm", tiny)
    blob = safe_torch_load(folder / "checkpoint-2.pth.tar")
    assert vars(blob["args"])["sched"] == "cosine" and type(blob["args"]).__module__ != "argparse"
    out = tmp_path / "t.csv"
    assert _analyze(folder, out, mod, "tiny", "tiny_batches", "--metrics", "loss,trace") == 0
    df = pd.read_csv(out)
    assert df.epoch.unique().tolist() == [1, 2, 10] and (df.status == "ok").all()
    torch.manual_seed(2)
    with torch.no_grad():
        want = nn.functional.cross_entropy(tiny()(tiny_batches()[0][0]), tiny_batches()[0][1])
    got = df[(df.epoch == 2) & (df.metric == "loss")].value.item()
    assert got == pytest.approx(float(want), rel=1e-6)
    assert _surface(folder, tmp_path / "s", mod, "tiny", "tiny_batches") == 0


def test_a_torch_without_stand_ins_says_what_to_do(tmp_path, monkeypatch):
    folder = _lm.timm_files(tmp_path / "timm", tiny, epochs=(1,))
    monkeypatch.setattr("analysis.io._STUBS_READABLE", False)  # torch < 2.6
    with pytest.raises(CheckpointError, match=r"argparse.Namespace .*; upgrade to torch >= 2.6"):
        safe_torch_load(folder / "checkpoint-1.pth.tar")


def test_a_namespace_stub_builds_nothing_else(tmp_path):
    """Only the class name is mapped: another global in the same file is still refused."""
    path = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": tiny().state_dict(), "args": types.SimpleNamespace(a=1)}, path)
    with pytest.raises(CheckpointError, match="refused: the file asks to build types"):
        safe_torch_load(path)


def test_bert_masked_lm_without_its_tied_decoder_loads(tmp_path):
    model = _lm.bert(seed=1)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("cls.predictions.dec")}
    torch.save(sd, tmp_path / "bert.pt")
    fresh = load_checkpoint(_lm.bert(seed=2), tmp_path / "bert.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # a key the model does not tie to one in the file still refuses, as before
    del sd["bert.embeddings.LayerNorm.bias"]
    torch.save(sd, tmp_path / "bert.pt")
    with pytest.raises(CheckpointError, match="1 missing .first: 'bert.embeddings.LayerNorm.bias'"):
        load_checkpoint(_lm.bert(), tmp_path / "bert.pt")


def test_two_matching_prefixes_ask_for_strip_prefix(tmp_path, mod, capsys):
    torch.manual_seed(0)
    student, teacher = tiny(), tiny()
    state = {**{f"student.{k}": v for k, v in student.state_dict().items()},
             **{f"teacher.{k}": v for k, v in teacher.state_dict().items()}}  # fmt: skip
    torch.save({"state_dict": state}, tmp_path / "distill.ckpt")
    with pytest.raises(CheckpointError, match="'student.' and 'teacher.'; choose one with"):
        load_state_dict(tmp_path / "distill.ckpt", model=tiny())
    got = load_checkpoint(tiny(), tmp_path / "distill.ckpt", prefix="teacher.")
    assert torch.equal(got[0].weight, teacher[0].weight)
    out = tmp_path / "t.csv"
    extra = ("--metrics", "loss", "--strip-prefix", "teacher.")
    assert _analyze(tmp_path, out, mod, "tiny", "tiny_batches", *extra) == 0
    with pytest.raises(CheckpointError, match="no key starts with 'pupil.'"):
        load_checkpoint(tiny(), tmp_path / "distill.ckpt", prefix="pupil.")


@pytest.mark.parametrize(
    "names, order",
    [
        (["step_500.pt", "step_1500.pt", "step_50.pt"], [50, 500, 1500]),
        (["global_step20.pt", "global_step3.pt"], [3, 20]),
        (["checkpoint-1500.pt", "checkpoint-500.pt", "checkpoint-90.pt"], [None] * 3),
    ],
)
def test_names_by_step_sort_numerically(tmp_path, names, order):
    for n in names:
        torch.save(tiny().state_dict(), tmp_path / n)
    found = [p.name for _, p in find_checkpoints(tmp_path)]
    assert found == sorted(names, key=lambda n: int("".join(c for c in n if c.isdigit())))
    assert [checkpoint_step(tmp_path / n) for n in found] == order
    df = analyze_run(tmp_path, ["loss"], model_factory=tiny, data=tiny_batches(), out=False,
                     progress=False)  # fmt: skip
    assert df.checkpoint.tolist() == found


def test_shard_index_naming_a_path_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    index = {"metadata": {}, "weight_map": {"0.weight": "../../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shards must be .* file names beside it"):
        load_checkpoint(tiny(), folder)


def test_a_real_lightning_run_loads_under_its_net_attribute(tmp_path):
    """The files a Lightning Trainer writes (hyper-parameters, loops, optimizer and
    scheduler states beside ``net.``/``criterion.`` keys) load as data."""
    pl = pytest.importorskip("lightning.pytorch", reason="writes a real Lightning run")

    class Module(pl.LightningModule):
        def __init__(self, lr=0.1):
            super().__init__()
            self.save_hyperparameters()
            self.net, self.criterion = tiny(), nn.CrossEntropyLoss(weight=torch.ones(3))

        def training_step(self, batch, _):
            return self.criterion(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    keep = pl.callbacks.ModelCheckpoint(tmp_path / "ckpts", save_top_k=-1, save_last=True)
    trainer = pl.Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False, callbacks=[keep],
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    module = Module()
    samples = list(zip(*tiny_batches()[0], strict=True))
    trainer.fit(module, torch.utils.data.DataLoader(samples, batch_size=5))
    df = analyze_run(tmp_path / "ckpts", ["loss"], model_factory=tiny, data=tiny_batches(),
                     out=False, progress=False)  # fmt: skip
    assert df.checkpoint.tolist() == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    assert df.step.tolist()[:2] == [2, 4] and (df.status == "ok").all()
    with torch.no_grad():
        want = nn.functional.cross_entropy(module.net(tiny_batches()[0][0]), tiny_batches()[0][1])
    assert df.value.iloc[-1] == pytest.approx(float(want), rel=1e-6)
