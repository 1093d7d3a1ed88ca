"""Data sets (digits, mnist1d, CIFAR python format from a folder), batches, models, run helpers."""

import pickle

import numpy as np
import pytest
import torch

from saf import MODELS, build_model, data_batches, load_dataset
from saf.data import IndexedDataset
from saf.runs import list_checkpoints, read_metrics, read_run


def _fake_cifar(root, n=6, classes=10):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, classes, n))}  # fmt: skip
        (d / name).write_bytes(pickle.dumps(batch))
    return d


def test_cifar_python_folder_read_normalised_and_augmented(tmp_path):
    _fake_cifar(tmp_path)
    train, test = (
        load_dataset("cifar10", "train", tmp_path, augment=True),
        load_dataset("cifar10", "test", tmp_path),
    )
    assert len(train) == 30 and len(test) == 6 and train.in_shape == (3, 32, 32)
    assert train.augment and not test.augment
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    idx = torch.arange(8)
    a, b = train.get_batch(idx, g1)[0], train.get_batch(idx, g2)[0]
    assert torch.equal(a, b) and not torch.equal(a, train.x[idx])  # seeded, and it changes x
    padded = torch.nn.functional.pad(train.x[idx], (4, 4, 4, 4))
    for k in range(8):  # each image is a 32x32 crop of the zero-padded one, maybe flipped
        crops = [padded[k, :, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(a[k], c) or torch.equal(a[k], c.flip(-1)) for c in crops)
    assert not IndexedDataset(train.x, train.y, 10).augment


def test_cifar_missing_files_and_unsafe_pickle_refused(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        load_dataset("cifar10", "train", tmp_path)
    d = _fake_cifar(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        load_dataset("cifar10", "test", tmp_path / "c")


def test_unknown_names_raise_value_error():
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg", 10, (1, 8, 8))


def test_data_batches_fixed_order_and_balanced_limit():
    full = data_batches("digits", "test", batch_size=100)
    assert [len(y) for _, y in full] == [100, 100, 100, 60]
    ds = load_dataset("digits", "test")
    assert torch.equal(torch.cat([x for x, _ in full]), ds.x)
    sub = data_batches("digits", batch_size=1000, limit=50)
    assert torch.bincount(sub[0][1]).tolist() == [5] * 10
    assert torch.equal(sub[0][0], data_batches("digits", batch_size=1000, limit=50)[0][0])


def test_mnist1d_shapes():
    ds = load_dataset("mnist1d", "test")
    assert len(ds) == 1000 and ds.in_shape == (1, 40) and ds.num_classes == 10


@pytest.mark.parametrize(
    "name,shape,params",
    [("resnet_small", (1, 8, 8), None), ("resnet_small", (1, 40), None), ("mlp", (1, 8, 8), 26122),
     ("resnet18", (3, 32, 32), 11173962), ("wrn28_10", (3, 32, 32), 36479194)],
)  # fmt: skip
def test_models_shapes_and_parameter_counts(name, shape, params):
    net = build_model(name, 10, shape)
    if params is not None:  # ResNet-18: 11.17M, WRN-28-10: 36.5M (the published counts)
        assert sum(p.numel() for p in net.parameters()) == params
    if name != "wrn28_10":
        assert net(torch.randn(2, *shape)).shape == (2, 10)
    assert set(MODELS) == {"resnet_small", "mlp", "resnet18", "wrn28_10"}


def test_run_helpers_on_a_foreign_folder(tmp_path):
    with pytest.raises(ValueError, match="run.json"):
        read_run(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match="run.json"):
        read_run(tmp_path)
    assert list_checkpoints(tmp_path) == [] and read_metrics(tmp_path).empty


def test_vectorised_crop_flip_equals_per_sample_loop():
    from saf.data import _crop_flip

    x, g = torch.randn(16, 3, 32, 32), torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (2, 16), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    crops = [padded[k, :, dy[k] : dy[k] + 32, dx[k] : dx[k] + 32] for k in range(16)]
    expect = torch.stack([c.flip(-1) if f else c for c, f in zip(crops, flip, strict=True)])
    assert torch.equal(_crop_flip(x, torch.Generator().manual_seed(3)), expect)
