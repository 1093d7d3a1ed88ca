"""Checkpoint formats people really have, each loading to the same weights; epochs from names
and from the file's own field."""

import pytest
import torch
from torch import nn

from analysis import (
    CheckpointError,
    atomic_torch_save,
    checkpoint_epoch,
    epoch_from_name,
    find_checkpoints,
    load_checkpoint,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)


def _reference() -> dict:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.body[1].running_mean.normal_()
    return net.state_dict()


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


FORMATS = {
    "bare": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 2},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "model_state_dict": lambda sd: {"model_state_dict": sd, "epoch": 2, "loss": 0.5},
    "net": lambda sd: {"net": sd},
    "ema": lambda sd: {"ema": sd, "step": 10},
    "module": lambda sd: {"module": sd},
    "ddp": lambda sd: _prefixed(sd, "module."),
    "compile": lambda sd: _prefixed(sd, "_orig_mod."),
    "ddp+compile": lambda sd: _prefixed(sd, "module._orig_mod."),
    "lightning": lambda sd: {
        "epoch": 4,
        "global_step": 40,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": _prefixed(sd, "model."),
        "hyper_parameters": {"lr": 0.1, "name": "x"},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
    },  # fmt: skip
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_loads_to_the_same_weights(tmp_path, fmt):
    ref = _reference()
    suffix = ".ckpt" if fmt == "lightning" else ".pt"
    atomic_torch_save(FORMATS[fmt](ref), tmp_path / f"last{suffix}")
    net = load_checkpoint(Net(), tmp_path / f"last{suffix}")
    for k, v in net.state_dict().items():
        assert torch.equal(v, ref[k]), (fmt, k)


def test_safetensors_and_a_chosen_key(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    ref = _reference()
    save_file(_prefixed(ref, "module."), str(tmp_path / "w.safetensors"))
    assert torch.equal(load_checkpoint(Net(), tmp_path / "w.safetensors").head.weight,
                       ref["head.weight"])  # fmt: skip
    atomic_torch_save({"teacher": {"weights": ref}, "student": {}}, tmp_path / "k.pt")
    net = load_checkpoint(Net(), tmp_path / "k.pt", key="teacher.weights")
    assert torch.equal(net.head.bias, ref["head.bias"])
    with pytest.raises(CheckpointError, match="no key 'teacher.w'"):
        load_checkpoint(Net(), tmp_path / "k.pt", key="teacher.w")


def test_a_prefix_is_stripped_only_where_it_makes_the_keys_match(tmp_path):
    class Wrapped(nn.Module):  # its own keys begin with "model."
        def __init__(self):
            super().__init__()
            self.model = Net()

    ref = {f"model.{k}": v for k, v in _reference().items()}
    atomic_torch_save(ref, tmp_path / "w.pt")
    net = load_checkpoint(Wrapped(), tmp_path / "w.pt")
    assert torch.equal(net.model.head.weight, ref["model.head.weight"])


def test_a_mismatch_names_the_first_missing_and_unexpected_keys_whole(tmp_path):
    sd = _reference()
    sd["extra.very.long.layer.name.weight"] = sd.pop("head.weight")
    atomic_torch_save(sd, tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(Net(), tmp_path / "m.pt")
    assert "'head.weight'" in str(e.value)
    assert "'extra.very.long.layer.name.weight'" in str(e.value)


def test_int_keys_and_non_tensors_are_named_not_a_traceback(tmp_path):
    atomic_torch_save({0: torch.zeros(2)}, tmp_path / "i.pt")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_checkpoint(Net(), tmp_path / "i.pt")


@pytest.mark.parametrize(
    "name, epoch",
    [
        ("epoch=0-step=22.pt", 0),
        ("resnet18-epoch=01-val_acc=0.91.pt", 1),
        ("epoch_0012.pt", 12),
        ("ep7.pth", 7),
        ("model-epoch-3.pt", 3),
        ("12.pt", 12),
        ("step-3.pt", None),
        ("best.pt", None),
    ],
)
def test_epoch_from_the_name(name, epoch):
    assert epoch_from_name(name) == epoch


def test_epoch_from_the_files_own_field_and_a_regex(tmp_path):
    ref = _reference()
    atomic_torch_save(FORMATS["lightning"](ref), tmp_path / "last.ckpt")
    atomic_torch_save({"state_dict": ref, "epoch": True}, tmp_path / "flag.pt")  # not a count
    atomic_torch_save(ref, tmp_path / "net-9.pt")
    assert checkpoint_epoch(tmp_path / "last.ckpt") == 4
    assert checkpoint_epoch(tmp_path / "flag.pt") is None
    assert checkpoint_epoch(tmp_path / "net-9.pt") is None
    assert checkpoint_epoch(tmp_path / "net-9.pt", regex=r"net-(\d+)") == 9
    assert [e for e, _ in find_checkpoints(tmp_path)] == [4, None, None]
