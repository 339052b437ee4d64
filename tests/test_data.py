"""The data loaders, on tiny archives that the tests write in every supported layout."""

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from eqx_curv.experiments import data


_CLASSES = ("cat", "dog")
_RNG = np.random.default_rng(0)
# 2 classes x 3 training and 2 test images, 4x4 RGB, ordered by class.
_TRAIN = _RNG.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
_TEST = _RNG.integers(0, 256, (4, 4, 4, 3), dtype=np.uint8)
_TRAIN_LABELS = np.array([0, 0, 0, 1, 1, 1], np.int32)
_TEST_LABELS = np.array([0, 0, 1, 1], np.int32)


def _png(image):
    out = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
        out, "PNG"
    )
    return out.getvalue()


def _write_tree(root, train=_TRAIN, test=_TEST):
    for split, images, labels in (
        ("train", train, _TRAIN_LABELS),
        ("test", test, _TEST_LABELS),
    ):
        for number, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / _CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{number:04d}.png").write_bytes(_png(image))
    return root


def _tar(source, archive, arcname):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=arcname)
    return archive


def _write_batches(folder):
    """The official python layout: five training batches, a test batch, the meta."""
    folder.mkdir(parents=True)

    def rows(images):
        return images.transpose(0, 3, 1, 2).reshape(len(images), -1)

    bounds = [0, 2, 3, 4, 5, 6]
    for i in range(5):
        part = slice(bounds[i], bounds[i + 1])
        batch = {b"data": rows(_TRAIN[part]), b"labels": _TRAIN_LABELS[part].tolist()}
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch))
    test = {b"data": rows(_TEST), b"labels": _TEST_LABELS.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {b"label_names": [c.encode() for c in _CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


def _official(tmp_path):
    batches = _write_batches(tmp_path / "extract" / "cifar-10-batches-py")
    return _tar(batches, tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(dataset, name):
    np.testing.assert_array_equal(dataset.train_images, _TRAIN)
    np.testing.assert_array_equal(dataset.train_labels, _TRAIN_LABELS)
    np.testing.assert_array_equal(dataset.test_images, _TEST)
    np.testing.assert_array_equal(dataset.test_labels, _TEST_LABELS)
    assert dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int32
    assert dataset.classes == _CLASSES
    assert dataset.name == name


def test_every_layout_loads_the_same_arrays(tmp_path):
    cache = tmp_path / "cache"
    official = _official(tmp_path)
    batches = official.parent / "extract" / "cifar-10-batches-py"
    tree = _write_tree(tmp_path / "mytree")
    # One top-level folder, with a stray file beside it.
    (tmp_path / "README").write_text("tiny")
    nested = tmp_path / "nested.tar.gz"
    with tarfile.open(nested, "w:gz") as tar:
        tar.add(tree, arcname="cifar10-png")
        tar.add(tmp_path / "README", arcname="README")
    flat = tmp_path / "flat.tar.gz"
    with tarfile.open(flat, "w:gz") as tar:
        tar.add(tree / "train", arcname="train")
        tar.add(tree / "test", arcname="test")
    holder = tmp_path / "holder"
    holder.mkdir()
    _tar(tree, holder / "tree.tar.gz", "mytree")
    for source in (official, official.parent, batches, batches.parent):
        _check(data.load_cifar10(source, cache_dir=cache, sha256=None), "cifar10")
    _check(
        data.load_cifar10(official, cache_dir=cache, sha256=_sha256(official)),
        "cifar10",
    )
    for source in (tree, nested, flat, holder):
        _check(data.load_dataset("cifar10", source, cache_dir=cache), "cifar10")
    _check(data.load_image_folder(tree, cache_dir=cache), "mytree")
    _check(data.load_dataset("folder", nested, cache_dir=cache), "cifar10-png")
    _check(data.load_image_folder(flat, cache_dir=cache), "flat")
    _check(data.load_image_folder(holder, cache_dir=cache), "mytree")
    # The tree's parent holds one tree besides the other files: that is found too.
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "mytree").symlink_to(tree)
    _check(data.load_image_folder(tmp_path / "only", cache_dir=cache), "mytree")


def test_grey_and_jpeg_images(tmp_path):
    grey_train, grey_test = _TRAIN[..., :1], _TEST[..., :1]
    tree = _write_tree(tmp_path / "grey", grey_train, grey_test)
    dataset = data.load_image_folder(tree, cache_dir=tmp_path / "cache")
    assert dataset.train_images.shape == (6, 4, 4, 1)
    np.testing.assert_array_equal(dataset.test_images, grey_test)
    smooth = np.broadcast_to(np.uint8(100), (4, 4, 3))
    jpeg = tmp_path / "jpeg"
    for split in ("train", "test"):
        for cls in _CLASSES:
            (jpeg / split / cls).mkdir(parents=True)
            Image.fromarray(smooth).save(jpeg / split / cls / "a.JPG", "JPEG")
    dataset = data.load_image_folder(jpeg, cache_dir=tmp_path / "cache")
    assert dataset.train_images.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(dataset.train_images, 100, atol=3)


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    official = _official(tmp_path)
    tree = _write_tree(tmp_path / "tree")
    nested = _tar(tree, tmp_path / "tree.tar.gz", "tree")
    data.load_cifar10(official, cache_dir=cache, sha256=None)
    data.load_image_folder(tree, cache_dir=cache)
    data.load_image_folder(nested, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 3
    assert not list(cache.glob("*.part"))

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(data, "_decode_image", fail)
    monkeypatch.setattr(data, "_decode_batches", fail)
    _check(data.load_cifar10(official, cache_dir=cache, sha256=None), "cifar10")
    _check(data.load_image_folder(tree, cache_dir=cache), "tree")
    _check(data.load_image_folder(nested, cache_dir=cache), "tree")
    # A changed source is decoded again: the key holds sizes and modification times.
    image = tree / "train" / "cat" / "0000.png"
    os.utime(image, ns=(0, image.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_image_folder(tree, cache_dir=cache)
    # A damaged cache file is decoded again, not an error.
    monkeypatch.undo()
    for cached in cache.glob("*.npz"):
        cached.write_bytes(b"not an npz")
    _check(data.load_image_folder(nested, cache_dir=cache), "tree")


def test_cache_inside_the_tree(tmp_path, monkeypatch):
    # The cache's own files do not change the key of the tree they sit in.
    tree = _write_tree(tmp_path / "tree")
    batches = _write_batches(tmp_path / "cifar-10-batches-py")
    data.load_image_folder(tree, cache_dir=tree / "cache")
    data.load_cifar10(batches, cache_dir=batches / "cache")
    monkeypatch.setattr(data, "_decode_image", None)
    monkeypatch.setattr(data, "_decode_batches", None)
    _check(data.load_image_folder(tree, cache_dir=tree / "cache"), "tree")
    _check(data.load_cifar10(batches, cache_dir=batches / "cache"), "cifar10")
    # Written with the permissions of any new file (not private to the owner).
    umask = os.umask(0)
    os.umask(umask)
    (cached,) = (tree / "cache").glob("*.npz")
    assert cached.stat().st_mode & 0o777 == 0o666 & ~umask


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EQX_CURV_CACHE", str(tmp_path / "here"))
    assert data.default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("EQX_CURV_CACHE")
    assert data.default_cache_dir().parts[-2:] == (".cache", "eqx_curv")


def test_download(tmp_path):
    official = _official(tmp_path)
    url = official.as_uri()
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="put the official cifar-10-python"):
        data.load_cifar10(cache_dir=cache, download=False)
    with pytest.raises(
        ValueError, match=f"has sha256 {_sha256(official)}.*sha256=None"
    ):
        data.load_cifar10(cache_dir=cache, url=url, sha256="0" * 64)
    assert not list(cache.iterdir())  # nothing kept, no partial file
    with pytest.raises(FileNotFoundError, match="Downloading .* failed.*put the"):
        data.load_cifar10(cache_dir=cache, url=(tmp_path / "none.tar.gz").as_uri())
    dataset = data.load_cifar10(cache_dir=cache, url=url, sha256=_sha256(official))
    _check(dataset, "cifar10")
    assert _sha256(cache / "cifar-10-python.tar.gz") == _sha256(official)
    # The archive in the cache is used from now on, with no download.
    _check(data.load_cifar10(cache_dir=cache, download=False), "cifar10")


def test_wrong_checksum(tmp_path):
    official = _official(tmp_path)
    expected = f"has sha256 {_sha256(official)}, but {data.CIFAR10_SHA256} was expected"
    with pytest.raises(
        ValueError, match=expected + ".*Delete the file and re-download"
    ):
        data.load_dataset("cifar10", official, cache_dir=tmp_path / "cache")


def test_missing_files(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        data.load_cifar10(tmp_path / "nowhere", cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No data set was found in .*empty"):
        data.load_image_folder(tmp_path / "empty", cache_dir=cache)
    batches = _write_batches(tmp_path / "cifar-10-batches-py")
    (batches / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3 is missing"):
        data.load_cifar10(batches, cache_dir=cache)
    tree = _write_tree(tmp_path / "tree")
    nested = _tar(tree / "train", tmp_path / "train_only.tar.gz", "train")
    with pytest.raises(ValueError, match="no test/<class>/ images"):
        data.load_image_folder(nested, cache_dir=cache)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b" + b"x" * 100)
    with pytest.raises(ValueError, match="broken.tar.gz could not be read"):
        data.load_image_folder(tmp_path / "broken.tar.gz", cache_dir=cache)


@pytest.mark.parametrize("archived", [False, True])
def test_bad_trees(tmp_path, archived):
    def load(tree):
        if archived:
            tree = _tar(tree, tree.with_suffix(".tar.gz"), tree.name)
        return data.load_image_folder(tree, cache_dir=tmp_path / "cache")

    corrupt = _write_tree(tmp_path / "corrupt")
    (corrupt / "test" / "dog" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match="test/dog/0003.png.* could not be decoded"):
        load(corrupt)
    missing = _write_tree(tmp_path / "missing")
    (missing / "train" / "bird").mkdir()
    (missing / "train" / "bird" / "0000.png").write_bytes(_png(_TRAIN[0]))
    with pytest.raises(ValueError, match="class folder train/bird .* has no test/bird"):
        load(missing)
    empty = _write_tree(tmp_path / "empty")
    (empty / "train" / "bird").mkdir()
    (empty / "test" / "bird").mkdir()
    (empty / "test" / "bird" / "0000.png").write_bytes(_png(_TRAIN[0]))
    with pytest.raises(ValueError, match="class folder train/bird .* holds no"):
        load(empty)
    sizes = _write_tree(tmp_path / "sizes")
    (sizes / "test" / "cat" / "0001.png").write_bytes(
        _png(np.zeros((5, 4, 3), np.uint8))
    )
    with pytest.raises(
        ValueError, match="test/cat/0001.png.* is 4x5 RGB, but .* 4x4 RGB"
    ):
        load(sizes)
    modes = _write_tree(tmp_path / "modes")
    (modes / "train" / "dog" / "0004.png").write_bytes(_png(_TRAIN[4, ..., :1]))
    with pytest.raises(ValueError, match="dog/0004.png.* is 4x4 L, but"):
        load(modes)
    palette = _write_tree(tmp_path / "palette")
    out = io.BytesIO()
    Image.fromarray(_TRAIN[0]).convert("P").save(out, "PNG")
    (palette / "train" / "cat" / "0000.png").write_bytes(out.getvalue())
    with pytest.raises(ValueError, match="0000.png.* has mode P.*convert"):
        load(palette)


def test_digits_dataset():
    dataset = data.load_dataset()
    assert dataset.name == "digits"
    assert dataset.classes == tuple("0123456789")
    assert dataset.train_images.shape == (1437, 8, 8, 1)
    assert dataset.test_images.shape == (360, 8, 8, 1)
    assert dataset.train_images.dtype == np.uint8
    assert dataset.train_labels.dtype == np.int32
    assert dataset.train_images.max() == 255
    # Stratified: every class has its share of the test set.
    assert np.bincount(dataset.test_labels).min() >= 35
    # The same pixels as `digits()`, scaled from 0..16 to 0..255.
    inputs, _ = data.digits()
    expected = np.rint(inputs * 255).astype(np.uint8)
    images = np.concatenate([dataset.train_images, dataset.test_images])
    assert sorted(map(bytes, images.reshape(-1, 64))) == sorted(map(bytes, expected))


def test_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="`name` must be 'digits', 'cifar10' or"):
        data.load_dataset("mnist")
    with pytest.raises(ValueError, match="needs `data_dir`"):
        data.load_dataset("folder")
