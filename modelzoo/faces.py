"""Face data for DiveFace-style gender classification: find, label, preprocess, cache.

The dataset stage of the face task (source → **dataset** → trainer → store → detector). The
folder readers in :mod:`modelzoo.face_folders` are its source; :func:`load_face_data`
decodes, crops, resizes, splits and caches once in HDF5, so trainers get
:class:`~modelzoo.datasets.ImageSet` objects just as they do for the MNIST tasks. The group
skew of a training set (GenderWdb) is drawn here too.

Task and groups (DESIGN §2). Label = gender: 0 male, 1 female. Bias = DiveFace group:
0 ``east_asian`` (East Asian), 1 ``african_indian`` (Sub-Saharan & South Indian),
2 ``caucasian`` (Caucasian).

Splits: a test set with the same number of images in each of the six gender×group cells
(``TEST_FRACTION`` of the smallest cell unless ``test_per_cell`` is given), so per-group
accuracy is measured on equal footing; then the rest of every cell is halved at random into
two disjoint training pools A and B of matching composition (IFBiD's two pools, for
cross-pool detector tests). Images stay uint8 (N, 3, S, S) RGB in the cache; trainers divide
by 255 as they do for every other task.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from modelzoo.datasets import ImageSet
from modelzoo.face_folders import (
    GENDERS,
    GROUPS,
    IMAGE_SUFFIXES,
    FaceDataError,
    FaceRecord,
    FaceScan,
    detect_layout,
    existing_folder,
    find_face_folder,
    scan_faces,
)
from modelzoo.sources import user_cache_dir

# Re-exported: a dataset user finds the whole face task here.
__all__ = ["BIAS_GROUPS", "GENDERS", "GROUPS", "IMAGE_SUFFIXES", "FaceData", "FaceDataError", "decode_face",
           "detect_layout", "find_face_folder", "group_counts", "group_shares", "largest_skewed_size",
           "load_face_data", "scan_faces", "skewed_subset"]

SPLITS = ("pool_a", "pool_b", "test")
TEST_FRACTION = 0.15
CACHE_FORMAT_VERSION = 2  # 2: copies of one file are dropped before splitting

@dataclass(frozen=True)
class FaceData:
    """Preprocessed faces: two disjoint training pools and a cell-balanced test set.

    ``paths`` maps each split name in :data:`SPLITS` to the folder-relative file of every
    image, in order, so disjointness and provenance can be checked; ``cache_file`` is the
    HDF5 file the data came from; ``fingerprint`` identifies the scanned files and labels
    (a zoo records it and refuses to resume on other data).
    """

    pool_a: ImageSet
    pool_b: ImageSet
    test: ImageSet
    skipped: dict[str, int]
    paths: dict[str, tuple[str, ...]]
    cache_file: Path
    fingerprint: str

    def pool(self, name: str) -> ImageSet:
        """Training pool "A" or "B" (IFBiD's two disjoint pools)."""
        if name not in ("A", "B"):
            raise FaceDataError(f"face pools are 'A' and 'B', got {name!r}")
        return self.pool_a if name == "A" else self.pool_b


# ---------------------------------------------------------------- locating and detecting


def group_counts(imageset: ImageSet) -> np.ndarray:
    """Images per cell as a 2×3 table: rows are GENDERS, columns GROUPS."""
    table = np.zeros((len(GENDERS), len(GROUPS)), dtype=np.int64)
    np.add.at(table, (imageset.labels, imageset.bias), 1)
    return table


# ---------------------------------------------------------------- layout readers


_Split = tuple[ImageSet, tuple[str, ...]]  # a split's images and the folder-relative file of each


def load_face_data(folder: str | Path, image_size: int = 48, seed: int = 0, min_age: int | None = 18,
                   cache_dir: str | Path | None = None, layout: str = "auto", *,
                   test_per_cell: int | None = None, progress: bool = True) -> FaceData:
    """Decode, crop, resize and split a face folder once; later calls read the HDF5 cache.

    The cache key covers every argument that changes the result and a fingerprint of the
    scanned files (relative names, sizes, labels), so an edited folder is re-processed. A
    damaged cache file is rebuilt. Unreadable images are skipped and counted.
    """
    folder = existing_folder(folder)
    if not isinstance(image_size, int) or not 8 <= image_size <= 512:
        raise FaceDataError(f"image_size must be an int in [8, 512], got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise FaceDataError(f"seed must be a non-negative int, got {seed!r}")
    if test_per_cell is not None and (not isinstance(test_per_cell, int) or test_per_cell < 1):
        raise FaceDataError(f"test_per_cell must be a positive int or None, got {test_per_cell!r}")
    scan = scan_faces(folder, layout, min_age)
    if not scan.records:
        raise FaceDataError(f"{folder}: no usable {scan.layout} face images; skipped: {scan.skipped}")
    relative = [Path(os.path.relpath(record.path, folder)).as_posix() for record in scan.records]
    fingerprint = _fingerprint(scan, relative)
    test_part = "auto" if test_per_cell is None else str(test_per_cell)
    name = (f"faces-{folder.name}-{scan.layout}-{image_size}px-seed{seed}-age{min_age or 0}"
            f"-test{test_part}-{fingerprint}.h5")
    path = Path(cache_dir or user_cache_dir()) / "datasets" / name
    if path.is_file():
        try:
            return _read_cache(path, fingerprint)
        except (OSError, KeyError, ValueError):
            pass  # a damaged or stale cache entry is rebuilt below
    splits, skipped = _preprocess(scan, relative, image_size, seed, test_per_cell, folder.name, progress)
    attrs = {"folder": str(folder), "layout": scan.layout, "image_size": image_size, "seed": seed,
             "min_age": min_age or 0, "test_per_cell": test_part, "fingerprint": fingerprint}
    _write_cache(path, splits, skipped, attrs)
    return FaceData(pool_a=splits["pool_a"][0], pool_b=splits["pool_b"][0], test=splits["test"][0],
                    skipped=skipped, paths={split: splits[split][1] for split in SPLITS}, cache_file=path,
                    fingerprint=fingerprint)


def _preprocess(scan: FaceScan, relative: list[str], image_size: int, seed: int, test_per_cell: int | None,
                label: str, progress: bool) -> tuple[dict[str, _Split], dict[str, int]]:
    """Drop copies of one file, decode the rest, drop the unreadable ones, then split:
    {split: (images, paths)}, skips."""
    distinct, copies = _distinct_files(scan.records)
    records = [scan.records[i] for i in distinct]
    images, decoded, unreadable = _decode_all(records, image_size, label, progress)
    kept = [distinct[i] for i in decoded]
    skipped = Counter(scan.skipped) + copies + Counter({"unreadable image": unreadable})
    skipped = dict(sorted(skipped.items()))
    labels = np.array([scan.records[i].gender for i in kept], dtype=np.int64)
    groups = np.array([scan.records[i].group for i in kept], dtype=np.int64)
    splits = {split: (ImageSet(images[index], labels[index], groups[index]),
                      tuple(relative[kept[i]] for i in index))
              for split, index in _split(labels, groups, test_per_cell, seed).items()}
    return splits, skipped


def _distinct_files(records: list[FaceRecord]) -> tuple[list[int], Counter[str]]:
    """Indices of the records to keep when one file's bytes appear under several names (UTKFace
    holds ~100 such copies): the first copy when the copies' labels agree, none when they
    conflict. A copy kept twice could land in a training pool and in the test set at once."""
    first: dict[bytes, int] = {}
    conflicting: set[bytes] = set()
    digests: list[bytes | None] = []
    for index, record in enumerate(records):
        try:
            digest = hashlib.blake2b(record.path.read_bytes(), digest_size=16).digest()
        except OSError:
            digest = None  # counted as unreadable when decoding fails
        digests.append(digest)
        if digest is None:
            continue
        if digest not in first:
            first[digest] = index
        elif (records[first[digest]].gender, records[first[digest]].group) != (record.gender, record.group):
            conflicting.add(digest)
    keep = [i for i, d in enumerate(digests) if d is None or (first[d] == i and d not in conflicting)]
    dropped: Counter[str] = Counter()
    for index, digest in enumerate(digests):
        if digest in conflicting:
            dropped["copies of one file with conflicting labels"] += 1
        elif digest is not None and first[digest] != index:
            dropped["copy of another file"] += 1
    return keep, dropped


def _fingerprint(scan: FaceScan, relative: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=8)
    # The processing version is part of it: a zoo made on other splits refuses to resume on these.
    digest.update(f"faces v{CACHE_FORMAT_VERSION}\n".encode())
    for record, name in zip(scan.records, relative, strict=True):
        digest.update(f"{name}\0{record.path.stat().st_size}\0{record.gender}\0{record.group}\0"
                      f"{record.age}\n".encode())
    digest.update(json.dumps(scan.skipped, sort_keys=True).encode())
    return digest.hexdigest()


def decode_face(path: Path, image_size: int) -> np.ndarray:
    """One image as uint8 (3, S, S) RGB: centre crop to a square, then resize to S×S."""
    with Image.open(path) as img:
        # JPEG only: let libjpeg decode at 1/2…1/8 scale when that still covers S; ~5× faster.
        img.draft("RGB", (image_size, image_size))
        rgb = img.convert("RGB")
    width, height = rgb.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    # Crop before resizing: resize(box=...) would let the filter read pixels outside the box.
    square = rgb.crop((left, top, left + side, top + side))
    small = square.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1)


def _decode_all(records: list[FaceRecord], image_size: int, label: str,
                progress: bool) -> tuple[np.ndarray, list[int], int]:
    images = np.empty((len(records), 3, image_size, image_size), dtype=np.uint8)
    kept: list[int] = []
    for index, record in enumerate(tqdm(records, desc=f"decoding {label}", unit="img", disable=not progress)):
        try:
            images[len(kept)] = decode_face(record.path, image_size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue  # truncated or non-image file: counted, not fatal
        kept.append(index)
    return images[: len(kept)], kept, len(records) - len(kept)


def _split(labels: np.ndarray, groups: np.ndarray, test_per_cell: int | None,
           seed: int) -> dict[str, np.ndarray]:
    """Indices of pool A, pool B and a test set with ``n_test`` images in every cell."""
    cells = [np.flatnonzero((labels == g) & (groups == k))
             for g in range(len(GENDERS)) for k in range(len(GROUPS))]
    smallest = min(len(cell) for cell in cells)
    n_test = test_per_cell if test_per_cell is not None else max(1, int(TEST_FRACTION * smallest))
    if smallest < n_test + 2:
        sizes = ", ".join(f"{GENDERS[i // len(GROUPS)]}/{GROUPS[i % len(GROUPS)]}={len(cell)}"
                          for i, cell in enumerate(cells))
        raise FaceDataError(
            f"every gender×group cell needs at least {n_test + 2} images ({n_test} for the balanced "
            f"test set, one per training pool); cells: {sizes}"
        )
    rng = np.random.default_rng([seed, 0xFACE])
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for i, cell in enumerate(cells):
        order = rng.permutation(cell)
        rest = order[n_test:]
        n_a = (len(rest) + i % 2) // 2  # alternate which pool gets an odd cell's extra image
        parts["test"].append(order[:n_test])
        parts["pool_a"].append(rest[:n_a])
        parts["pool_b"].append(rest[n_a:])
    return {split: np.sort(np.concatenate(chunks)) for split, chunks in parts.items()}


def _write_cache(path: Path, splits: dict[str, _Split], skipped: dict[str, int], attrs: dict) -> None:
    import h5py  # here, not at the top: reading specs and stores must not need it

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            for split, (imageset, names) in splits.items():
                group = h5.create_group(split)
                group.create_dataset("images", data=imageset.images, chunks=True, compression="lzf")
                group.create_dataset("labels", data=imageset.labels)
                group.create_dataset("bias", data=imageset.bias)
                group.create_dataset("paths", data=list(names), dtype=h5py.string_dtype())
            h5.attrs.update({**attrs, "skipped": json.dumps(skipped), "format_version": CACHE_FORMAT_VERSION})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_cache(path: Path, fingerprint: str) -> FaceData:
    import h5py  # here, not at the top: reading specs and stores must not need it

    with h5py.File(path, "r") as h5:
        stale = h5.attrs.get("format_version") != CACHE_FORMAT_VERSION
        if stale or h5.attrs.get("fingerprint") != fingerprint:
            raise KeyError("stale face cache")
        sets, names = {}, {}
        for split in SPLITS:
            group = h5[split]
            sets[split] = ImageSet(group["images"][()], group["labels"][()], group["bias"][()])
            names[split] = tuple(group["paths"].asstr()[()])
            if not len(sets[split].images) == len(sets[split].bias) == len(names[split]) == len(sets[split]):
                raise ValueError(f"{path}: split {split} has arrays of different lengths")
        skipped = json.loads(h5.attrs["skipped"])
    return FaceData(sets["pool_a"], sets["pool_b"], sets["test"], skipped, names, path, fingerprint)


# ---------------------------------------------------------------- group skew (GenderWdb)

BIAS_GROUPS = (*GROUPS, "balanced")


def group_shares(bias_group: str, skew: float) -> np.ndarray:
    """Share of each group in a training set skewed toward ``bias_group``.

    The favoured group gets ``skew`` and the other two split the rest equally; "balanced"
    gives every group a third whatever ``skew`` says. ``skew = 1`` trains on the favoured group
    alone, as IFBiD's and InsideBias's biased models were.
    """
    if bias_group not in BIAS_GROUPS:
        raise FaceDataError(f"bias_group must be one of {list(BIAS_GROUPS)}, got {bias_group!r}")
    if not 0 < skew <= 1:
        raise FaceDataError(f"skew must lie in (0, 1], got {skew}")
    if bias_group == "balanced":
        return np.full(len(GROUPS), 1 / len(GROUPS))
    shares = np.full(len(GROUPS), (1 - skew) / (len(GROUPS) - 1))
    shares[GROUPS.index(bias_group)] = skew
    return shares


def _allocation(shares: np.ndarray, size: int) -> np.ndarray:
    """Images per group for a training set of ``size``; the rounding remainder goes to the
    group with the largest share."""
    wanted = np.floor(shares * size).astype(int)
    wanted[np.argmax(shares)] += size - wanted.sum()
    return wanted


def largest_skewed_size(groups: np.ndarray, skew: float) -> int:
    """The largest training set every ``bias_group`` (balanced included) can draw at ``skew``
    from a pool with these group labels: one size for all, so models differ in group mix only."""
    counts = np.bincount(groups, minlength=len(GROUPS))
    size = int(counts.min() / max(skew, (1 - skew) / (len(GROUPS) - 1), 1 / len(GROUPS)))
    while size > 0 and any((_allocation(group_shares(b, skew), size) > counts).any() for b in BIAS_GROUPS):
        size -= 1  # rounding can ask one image more than the bound allows
    return size


def skewed_subset(groups: np.ndarray, bias_group: str, skew: float, size: int, seed: int) -> np.ndarray:
    """Sorted indices of ``size`` pool images whose group mix follows :func:`group_shares`.

    Drawn without replacement, seeded; raises :class:`FaceDataError` naming the short group
    when the pool cannot supply the mix (never silently changes the skew).
    """
    wanted = _allocation(group_shares(bias_group, skew), size)
    rng = np.random.default_rng([seed, 3])
    chosen = []
    for group, count in enumerate(wanted):
        members = np.flatnonzero(groups == group)
        if count > len(members):
            raise FaceDataError(
                f"the pool has {len(members)} {GROUPS[group]} images but bias_group={bias_group!r} at "
                f"skew={skew:g} with train_size={size} needs {count}; lower train_size "
                f"(at most {largest_skewed_size(groups, skew)} fits every bias_group) or the skew")
        chosen.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(chosen))
