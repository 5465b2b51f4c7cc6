"""Data for the accuracy benchmark: MNIST-1D generated offline, digits in k folds."""

import builtins

import numpy as np
import pytest

from kprune import datasets
from kprune.errors import KprunError


def test_mnist1d_shapes_types_and_split():
    pytest.importorskip("mnist1d", reason="mnist1d is an optional data package (in the [dev] extra)")
    (x, y), (xt, yt) = datasets.mnist1d(n=200, seed=0)
    assert x.shape == (160, 40, 1) and xt.shape == (40, 40, 1)
    assert y.shape == (160,) and yt.shape == (40,)
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert set(np.unique(np.concatenate([y, yt]))) == set(range(10))
    assert np.bincount(np.concatenate([y, yt]), minlength=10).tolist() == [20] * 10
    assert np.isfinite(x).all() and abs(float(np.concatenate([x, xt]).mean())) < 1e-4


def test_mnist1d_depends_on_seed_only_and_leaves_numpy_state_alone():
    pytest.importorskip("mnist1d", reason="mnist1d is an optional data package (in the [dev] extra)")
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    a = datasets.mnist1d(n=100, seed=1)
    assert np.random.rand() == expected  # the package's global seeding is undone
    b = datasets.mnist1d(n=100, seed=1)
    c = datasets.mnist1d(n=100, seed=2)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    assert not np.array_equal(a[0][0], c[0][0])


def test_mnist1d_test_size_and_bad_arguments():
    pytest.importorskip("mnist1d", reason="mnist1d is an optional data package (in the [dev] extra)")
    (x, _), (xt, _) = datasets.mnist1d(n=100, seed=0, test_size=0.5)
    assert len(x) == len(xt) == 50
    with pytest.raises(ValueError, match="n must be"):
        datasets.mnist1d(n=5)
    with pytest.raises(ValueError, match="test_size"):
        datasets.mnist1d(n=100, test_size=1.0)


def test_mnist1d_missing_package_names_pip_install(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "mnist1d" or name.startswith("mnist1d."):
            raise ImportError("No module named 'mnist1d'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(KprunError, match="pip install mnist1d"):
        datasets.mnist1d(n=100)


def test_digits_folds_test_every_image_exactly_once():
    folds = datasets.digits_folds(k=4, image_size=8, channels=1, seed=3)
    assert len(folds) == 4
    tests = np.concatenate([xt for _, (xt, _) in folds])
    assert len(tests) == 1797
    # every image once: the multiset of test images equals the whole data set
    (x, _), (xt, _) = datasets.digits(image_size=8, channels=1, test_size=0.5)
    whole = np.concatenate([x, xt]).reshape(1797, -1)
    key = lambda a: np.lexsort(a.T[::-1])  # noqa: E731
    flat = tests.reshape(1797, -1)
    np.testing.assert_array_equal(flat[key(flat)], whole[key(whole)])
    for (x_tr, y_tr), (x_te, y_te) in folds:
        assert len(x_tr) + len(x_te) == 1797 and len(y_tr) == len(x_tr)
        assert abs(len(x_te) - 1797 / 4) < 1
        assert x_tr.shape[1:] == (8, 8, 1) and y_te.dtype == np.int32


def test_digits_folds_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        datasets.digits_folds(k=1)
