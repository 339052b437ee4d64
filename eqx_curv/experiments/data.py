"""Image data sets for the experiments: the embedded digits, CIFAR-10 and image folders.

Every loader returns an `ImageDataset` of uint8 images `[N, H, W, C]` and int32 labels.
Decoded arrays are cached as one `.npz` per source, so a second run starts at once; see
`docs/data.md` for the layouts each loader reads.
"""

import concurrent.futures
import contextlib
import hashlib
import io
import math
import os
import pathlib
import pickle
import tarfile
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple

import numpy as np


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# sha256 of the official archive (its md5, given on the data set's page, is
# c58f30108f718f92721af3b95e74349a).
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
_ARCHIVE = "cifar-10-python.tar.gz"
_BATCHES = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLITS = ("train", "test")
_CHANNELS = {"L": 1, "RGB": 3}
# Bump when the cached arrays change meaning, so that old cache files are not read.
_CACHE_VERSION = "1"


class ImageDataset(NamedTuple):
    """A labelled image classification data set, split into train and test.

    **Fields:**

    - `train_images`: uint8 `[N, H, W, C]` (`C` is 1 for grey images, 3 for RGB).
    - `train_labels`: int32 `[N]`, indices into `classes`.
    - `test_images`: uint8 `[M, H, W, C]`.
    - `test_labels`: int32 `[M]`.
    - `classes`: the class names, in label order.
    - `name`: `"digits"`, `"cifar10"`, or the image-folder tree's name.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    name: str


def digits(
    num_examples: int | None = None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's embedded 8x8 handwritten digits (1,797 examples, 10 classes).

    **Arguments:**

    - `num_examples`: keep this many examples, drawn at random without replacement
        (all of them when `None`).
    - `seed`: the seed of that draw.

    **Returns:**

    `(inputs, labels)`: float32 inputs of shape `[N, 64]` scaled to `[0, 1]`, and int32
    labels of shape `[N]`.
    """
    from sklearn.datasets import load_digits

    images, targets = load_digits(return_X_y=True)
    inputs = (np.asarray(images) / 16.0).astype(np.float32)
    labels = np.asarray(targets).astype(np.int32)
    if num_examples is not None:
        if not 1 <= num_examples <= len(labels):
            raise ValueError(
                f"`num_examples` must be between 1 and {len(labels)} (the size of the "
                f"digits data set), got {num_examples}."
            )
        keep = np.random.default_rng(seed).permutation(len(labels))[:num_examples]
        inputs, labels = inputs[keep], labels[keep]
    return inputs, labels


def default_cache_dir() -> pathlib.Path:
    """Where decoded arrays and downloads go: `$EQX_CURV_CACHE`, else `~/.cache/eqx_curv`."""
    folder = os.environ.get("EQX_CURV_CACHE")
    if folder:
        return pathlib.Path(folder).expanduser()
    return pathlib.Path.home() / ".cache" / "eqx_curv"


def load_dataset(
    name: str = "digits",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load an image data set by name.

    **Arguments:**

    - `name`: `"digits"` (scikit-learn's embedded 8x8 digits as `[8, 8, 1]` images,
        a fixed stratified split of 1,437 training and 360 test images; needs no file),
        `"cifar10"` (see `load_cifar10`) or `"folder"` (see `load_image_folder`).
    - `data_dir`: where the files are: ignored for `"digits"`, optional for
        `"cifar10"`, required for `"folder"`.
    - `cache_dir`: where decoded arrays (and a download) are kept; `default_cache_dir()`
        when `None`.
    - `download`: for `"cifar10"` without `data_dir`, whether to download the official
        archive when the cache holds none.

    **Returns:**

    An `ImageDataset`.
    """
    if name == "digits":
        return _digits_dataset()
    if name == "cifar10":
        return load_cifar10(data_dir, cache_dir=cache_dir, download=download)
    if name == "folder":
        if data_dir is None:
            raise ValueError(
                "`load_dataset('folder')` needs `data_dir`: pass an image-folder tree "
                "(`train/<class>/*.png`, `test/<class>/...`) or a tar.gz of one."
            )
        return load_image_folder(data_dir, cache_dir=cache_dir)
    raise ValueError(
        f"`name` must be 'digits', 'cifar10' or 'folder', got {name!r}; for another data "
        "set, lay it out as an image-folder tree and pass name='folder'."
    )


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    url: str = CIFAR10_URL,
    sha256: str | None = CIFAR10_SHA256,
) -> ImageDataset:
    """CIFAR-10 (50,000 training and 10,000 test images, 32x32 RGB, 10 classes).

    The official archive holds pickles, and unpickling runs code: it is read only from
    the file given here or a download whose sha256 matched, so point `data_dir` only at
    files you trust (or keep `sha256` set).

    **Arguments:**

    - `data_dir`: the official `cifar-10-python.tar.gz`, a folder holding it or its
        extracted `cifar-10-batches-py/`, an image-folder tree (`train/<class>/*.jpg`,
        `test/<class>/...`), a tar.gz of such a tree (optionally under one top-level
        folder) or a folder holding that tar.gz. When `None`, the archive is looked for
        in `cache_dir`, and downloaded there when missing (if `download`).
    - `cache_dir`: where decoded arrays and the download are kept;
        `default_cache_dir()` when `None`.
    - `download`: whether to download the archive when `data_dir` is `None` and the
        cache holds none.
    - `url`: where to download it from.
    - `sha256`: the official archive's checksum, checked on a download and on an
        official archive given as `data_dir`; `None` skips the check.

    **Returns:**

    An `ImageDataset` named `"cifar10"`.
    """
    cache = _cache_dir(cache_dir)
    if data_dir is None:
        path = cache / _ARCHIVE
        if not path.is_file():
            if not download:
                raise FileNotFoundError(_where_to_put(cache, url))
            _download(url, path, sha256, cache)
    else:
        path = pathlib.Path(data_dir)
    arrays = _load(path, cache, sha256=sha256, url=url)
    return arrays._replace(name="cifar10")


def load_image_folder(
    path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> ImageDataset:
    """An image-folder tree: `train/<class>/*.jpg|png` and `test/<class>/...`.

    Every class of `train/` must be in `test/` and the other way round; classes are
    ordered by name and labelled 0, 1, ...; every image must have the same size and mode
    (`L` gives one channel, `RGB` three).

    **Arguments:**

    - `path`: the tree's folder, a tar.gz of the tree (optionally under one top-level
        folder), or a folder holding one such tar.gz.
    - `cache_dir`: where decoded arrays are kept; `default_cache_dir()` when `None`.

    **Returns:**

    An `ImageDataset` named after the tree's folder.
    """
    return _load(pathlib.Path(path), _cache_dir(cache_dir))


def _digits_dataset() -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    pixels, targets = load_digits(return_X_y=True)
    # Pixels are counts 0..16; scaled to 0..255 as an 8-bit image would be.
    images = np.rint(np.asarray(pixels) * (255 / 16)).astype(np.uint8)
    images = images.reshape(-1, 8, 8, 1)
    labels = np.asarray(targets).astype(np.int32)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=360, stratify=labels, random_state=0
    )
    classes = tuple(str(c) for c in range(10))
    return ImageDataset(
        images[train], labels[train], images[test], labels[test], classes, "digits"
    )


def _cache_dir(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
    return default_cache_dir() if cache_dir is None else pathlib.Path(cache_dir)


def _where_to_put(cache: pathlib.Path, url: str) -> str:
    return (
        f"CIFAR-10 was not found: put the official {_ARCHIVE} (from {url}) in "
        f"{cache}, or pass `data_dir=` the archive, a folder holding it or its "
        "extracted cifar-10-batches-py/, or an image-folder tree "
        "(train/<class>/*.jpg, test/<class>/...) or a tar.gz of one."
    )


@contextlib.contextmanager
def _written_atomically(target: pathlib.Path) -> Iterator[BinaryIO]:
    """A new file at `target`, renamed into place only once the block has written it.

    An interrupted or failed write leaves no file behind, so that a later run never
    reads half a download or half a cache file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}-{uuid.uuid4().hex}.part")
    try:
        with open(partial, "xb") as file:
            yield file
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _download(
    url: str, target: pathlib.Path, sha256: str | None, cache: pathlib.Path
) -> None:
    digest = hashlib.sha256()
    with _written_atomically(target) as out:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            raise FileNotFoundError(
                f"Downloading {url} failed ({error}). " + _where_to_put(cache, url)
            ) from error
        got = digest.hexdigest()
        if sha256 is not None and got != sha256.lower():
            raise ValueError(
                f"The file downloaded from {url} has sha256 {got}, but {sha256} was "
                "expected, so it was not kept: the download was corrupted or the URL "
                "serves another file. Try again, or pass `sha256=None` to accept it."
            )


def _fingerprint(path: pathlib.Path) -> str:
    """A key that changes when the source does: path, sizes and modification times."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\0{path.resolve()}".encode())
    if path.is_file():
        files = [path]
    else:
        # Only the data set's own files: a cache folder inside `path` must not count.
        batches = [path / n for n in (*_TRAIN_BATCHES, "test_batch", "batches.meta")]
        images = [p for s in _SPLITS for p in (path / s).rglob("*") if p.is_file()]
        files = sorted(p for p in batches + images if p.is_file())
    for file in files:
        stat = file.stat()
        digest.update(
            f"\0{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
        )
    return digest.hexdigest()[:20]


def _load(
    path: pathlib.Path,
    cache: pathlib.Path,
    *,
    sha256: str | None = None,
    url: str = CIFAR10_URL,
) -> ImageDataset:
    """Find the layout at `path`, and decode it or read its cached arrays."""
    path = _resolve(path)
    cached = cache / f"{path.name.split('.')[0]}-{_fingerprint(path)}.npz"
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as saved:
                return ImageDataset(
                    train_images=saved["train_images"],
                    train_labels=saved["train_labels"],
                    test_images=saved["test_images"],
                    test_labels=saved["test_labels"],
                    classes=tuple(str(c) for c in saved["classes"]),
                    name=str(saved["name"]),
                )
        except (OSError, ValueError, KeyError, zlib.error):
            pass  # a damaged cache file is decoded again and replaced
    if path.is_dir():
        if (path / _TRAIN_BATCHES[0]).is_file():
            arrays = _decode_batches(lambda n: _read_file(path / n), str(path))
        else:
            arrays = _decode_tree(_list_folder(path), path.name, str(path))
    else:
        arrays = _decode_archive(path, sha256, url)
    with _written_atomically(cached) as out:
        np.savez(
            out,
            **{k: getattr(arrays, k) for k in ImageDataset._fields[:4]},
            classes=np.array(arrays.classes, dtype=str),
            name=np.array(arrays.name, dtype=str),
        )
    return arrays


def _resolve(path: pathlib.Path) -> pathlib.Path:
    """The archive or folder at `path` that holds a data set, in the order documented."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass an existing archive or folder (see the layouts "
            "in the docstring of `load_cifar10` or `load_image_folder`)."
        )
    if path.is_file():
        return path
    if (path / _TRAIN_BATCHES[0]).is_file() or (path / "train").is_dir():
        return path
    for candidate in (path / _BATCHES, path / _ARCHIVE):
        if candidate.exists():
            return candidate
    trees = [p for p in path.iterdir() if (p / "train").is_dir()]
    archives = [p for p in path.iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
    if len(trees) + len(archives) == 1:
        return (trees + archives)[0]
    raise FileNotFoundError(
        f"No data set was found in {path}: it needs {_ARCHIVE}, an extracted "
        f"{_BATCHES}/, an image-folder tree (train/<class>/*.jpg, test/<class>/...), "
        f"or exactly one tar.gz of such a tree (found {len(trees)} trees and "
        f"{len(archives)} archives)."
    )


def _read_file(path: pathlib.Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the CIFAR-10 batches folder needs data_batch_1 to "
            "data_batch_5, test_batch and batches.meta; extract the archive again."
        )
    return path.read_bytes()


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _decode_archive(path: pathlib.Path, sha256: str | None, url: str) -> ImageDataset:
    # One forward pass over the (compressed) archive: gzip cannot seek backwards cheaply.
    members: dict[str, bytes] = {}
    folders: set[str] = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isdir():
                    folders.add(name.rstrip("/"))
                elif member.isfile() and not name.rpartition("/")[2].startswith("."):
                    file = tar.extractfile(member)
                    if file is not None:
                        members[name] = file.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise ValueError(
            f"The archive {path} could not be read ({error}): it is truncated, corrupt or "
            "not a tar archive; delete it and download or copy it again."
        ) from error
    batches = [n for n in members if n.rpartition("/")[2] == _TRAIN_BATCHES[0]]
    if batches:
        if sha256 is not None and (got := _sha256(path)) != sha256.lower():
            raise ValueError(
                f"The archive {path} has sha256 {got}, but {sha256} was expected: it is "
                f"incomplete, corrupt or another file. Delete the file and re-download it "
                f"(from {url}), or pass `sha256=None` to load it unchecked."
            )
        prefix = batches[0].removesuffix(_TRAIN_BATCHES[0])

        def read(name: str) -> bytes:
            if prefix + name not in members:
                raise ValueError(
                    f"The CIFAR-10 archive {path} lacks {prefix + name}; it is "
                    "incomplete: download or copy it again."
                )
            return members[prefix + name]

        return _decode_batches(read, str(path))
    tree, name = _list_archive(members, folders, path)
    return _decode_tree(tree, name, str(path))


def _decode_batches(read: Callable[[str], bytes], where: str) -> ImageDataset:
    """The official python batches: pickled dicts of uint8 rows, channel-major."""

    def unpickle(name: str) -> dict:
        try:
            return pickle.loads(read(name), encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
            raise ValueError(
                f"The CIFAR-10 batch {name} in {where} could not be read ({error}): it "
                "is corrupt; download or extract the archive again."
            ) from error

    meta = unpickle("batches.meta")
    classes = tuple(c.decode() for c in meta[b"label_names"])

    def split(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        batches = [unpickle(n) for n in names]
        rows = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[b"labels"], np.int32) for b in batches])
        side = math.isqrt(rows.shape[1] // 3)
        if (
            3 * side * side != rows.shape[1]
            or not ((labels >= 0) & (labels < len(classes))).all()
        ):
            raise ValueError(
                f"The CIFAR-10 batches in {where} hold rows of {rows.shape[1]} bytes or "
                f"labels outside 0..{len(classes) - 1}; they are not CIFAR-10 batches."
            )
        images = rows.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), labels

    train = split(_TRAIN_BATCHES)
    test = split(("test_batch",))
    (train_images, train_labels), (test_images, test_labels) = train, test
    return ImageDataset(
        train_images, train_labels, test_images, test_labels, classes, "cifar10"
    )


# split -> class -> [(where, bytes or file)], in the order of the labels' examples.
_Tree = dict[str, dict[str, list[tuple[str, bytes | pathlib.Path]]]]


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) and not name.startswith(".")


def _list_folder(root: pathlib.Path) -> _Tree:
    tree: _Tree = {}
    for split in _SPLITS:
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"The image-folder tree {root} has no {split}/ folder: put the images "
                f"in {root / split}/<class>/."
            )
        tree[split] = {
            folder.name: [
                (str(file), file)
                for file in sorted(folder.iterdir())
                if file.is_file() and _is_image(file.name)
            ]
            for folder in sorted((root / split).iterdir())
            if folder.is_dir() and not folder.name.startswith(".")
        }
    return tree


def _list_archive(
    members: dict[str, bytes], folders: set[str], path: pathlib.Path
) -> tuple[_Tree, str]:
    # The tree sits at the archive's root or under one top-level folder.
    parts = [n.split("/") for n in [*members, *folders]]
    tops = {p[0] for p in parts if len(p) > 1 and p[1] in _SPLITS}
    prefix = ""
    if not {p[0] for p in parts} & set(_SPLITS) and len(tops) == 1:
        prefix = tops.pop() + "/"
    name = prefix.rstrip("/") or path.name.split(".")[0]
    tree: _Tree = {split: {} for split in _SPLITS}
    for folder in sorted(folders):
        split, _, cls = folder.removeprefix(prefix).partition("/")
        if split in tree and cls and "/" not in cls and folder.startswith(prefix):
            tree[split].setdefault(cls, [])
    for member in sorted(members):
        inner = member.removeprefix(prefix).split("/")
        if len(inner) == 3 and inner[0] in tree and _is_image(inner[2]):
            where = f"{member} in {path}"
            tree[inner[0]].setdefault(inner[1], []).append((where, members[member]))
    for split in _SPLITS:
        if not tree[split]:
            raise ValueError(
                f"The archive {path} has no {prefix}{split}/<class>/ images: it must hold "
                "an image-folder tree (train/<class>/*.jpg, test/<class>/...), "
                "optionally under one top-level folder."
            )
    return tree, name


def _decode_tree(tree: _Tree, name: str, where: str) -> ImageDataset:
    classes = tuple(sorted(tree["train"]))
    for split, other in (("train", "test"), ("test", "train")):
        for cls, files in tree[split].items():
            if cls not in tree[other]:
                raise ValueError(
                    f"The class folder {split}/{cls} of {where} has no {other}/{cls}: "
                    f"add {other}/{cls}/ with its images, or remove {split}/{cls}/."
                )
            if not files:
                raise ValueError(
                    f"The class folder {split}/{cls} of {where} holds no .jpg or .png "
                    "image: add its images or remove the folder."
                )
    if not classes:
        raise ValueError(f"{where} has no class folders in train/ and test/.")
    entries = [
        (split, label, file)
        for split in _SPLITS
        for label, cls in enumerate(classes)
        for file in tree[split][cls]
    ]
    # Pillow decodes without the GIL; chunks keep the pool's own overhead small.
    chunks = [entries[i : i + 512] for i in range(0, len(entries), 512)]
    workers = min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        decoded = [
            image
            for chunk in pool.map(lambda c: [_decode_image(*e[2]) for e in c], chunks)
            for image in chunk
        ]
    first_where, first = entries[0][2][0], decoded[0]
    for (_, _, (file_where, _)), image in zip(entries, decoded):
        if image.shape != first.shape:
            raise ValueError(
                f"The image {file_where} is {_describe(image)}, but {first_where} is "
                f"{_describe(first)}: every image must have one size and mode; resize "
                "or convert it."
            )
    splits = {}
    for split in _SPLITS:
        keep = [i for i, e in enumerate(entries) if e[0] == split]
        images = np.stack([decoded[i] for i in keep])
        labels = np.array([entries[i][1] for i in keep], dtype=np.int32)
        splits[split] = (images, labels)
    (train_images, train_labels), (test_images, test_labels) = splits.values()
    return ImageDataset(
        train_images, train_labels, test_images, test_labels, classes, name
    )


def _describe(image: np.ndarray) -> str:
    height, width, channels = image.shape
    return f"{width}x{height} {'RGB' if channels == 3 else 'L'}"


def _decode_image(where: str, source: bytes | pathlib.Path) -> np.ndarray:
    """One image as uint8 `[H, W, C]`; a corrupt file is a sentence naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = source.read_bytes() if isinstance(source, pathlib.Path) else source
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(image) if mode in _CHANNELS else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        # Pillow's message for an unknown format names only its in-memory buffer.
        reason = "" if isinstance(error, UnidentifiedImageError) else f" ({error})"
        raise ValueError(
            f"The image {where} could not be decoded{reason}: it is corrupt or not an "
            "image; replace or delete it."
        ) from error
    if pixels is None:
        raise ValueError(
            f"The image {where} has mode {mode}; only L (grey) and RGB are read: "
            "convert it, e.g. with Pillow's `Image.convert('RGB')`."
        )
    return pixels.reshape(*pixels.shape[:2], _CHANNELS[mode]).astype(np.uint8)
