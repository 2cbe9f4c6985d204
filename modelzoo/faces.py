"""Face data for DiveFace-style gender classification: find, label, preprocess, cache.

Two stages of the flow (**source → dataset** → trainer → store → detector). The layout
readers are the source: they only read labels from file names, a CSV or annotation lists and
never open an image. :func:`load_face_data` is the dataset stage: it decodes, crops, resizes,
splits and caches once in HDF5, so trainers get :class:`~modelzoo.datasets.ImageSet` objects
just as they do for the MNIST tasks.

Task and groups (DESIGN §2). Label = gender: 0 male, 1 female. Bias = DiveFace group:
0 ``east_asian`` (East Asian), 1 ``african_indian`` (Sub-Saharan & South Indian),
2 ``caucasian`` (Caucasian).

Layouts (``detect_layout`` tries them in this order):

* ``diveface`` — what DiveFace's ``create_diveface.py`` builds from MegaFace: one sub-folder per
  class named ``Group1_Male``, ``Group1_Female``, ``Group2_Male``, … ``Group3_Female``
  (Group1 East Asian, Group2 Sub-Saharan & South Indian, Group3 Caucasian, per DiveFace's
  README), each holding ``<identity>/<image>``; every image below a class folder belongs to
  that class. DiveFace's annotation lists ``<class>.txt`` (one ``identity_folder/file_name``
  per line) may sit in the folder instead of, or beside, the class folders; a listed image is
  looked for at ``<folder>/<class>/<line>`` then at ``<folder>/<line>`` (a MegaFace tree). A
  class with a list is read from its list only. ``*_balanced.txt`` lists are ignored (they are
  subsets). DiveFace has no ages: ``age`` is None and ``min_age`` never drops these images.
* ``fairface`` — one or more ``*.csv`` files whose header holds ``file,age,gender,race``
  (FairFace's ``fairface_label_train.csv`` / ``fairface_label_val.csv``); ``file`` is relative
  to the folder. East Asian → east_asian; Black and Indian → african_indian; White →
  caucasian; Southeast Asian, Middle Eastern and Latino_Hispanic are skipped (DiveFace has no
  such group). The age bin's lower bound ("20-29" → 20, "more than 70" → 70) is the age, so
  the "10-19" bin is dropped at ``min_age=18``.
* ``utkface`` — image files directly in the folder named
  ``[age]_[gender]_[race]_[datetime].jpg.chip.jpg`` (or ``.jpg``/``.jpeg``/``.png``), gender
  0 male / 1 female, race 0 White → caucasian, 1 Black → african_indian, 2 Asian →
  east_asian, 3 Indian → african_indian, 4 Others → skipped. Files that are not images are
  ignored.

Every entry that is unlabeled or malformed is skipped and counted under one reason (the first
found, checked in the order: row/name → gender → race → age → file), never guessed at.

Splits: a test set with the same number of images in each of the six gender×group cells
(``TEST_FRACTION`` of the smallest cell unless ``test_per_cell`` is given), so per-group
accuracy is measured on equal footing; then the rest of every cell is halved at random into
two disjoint training pools A and B of matching composition (IFBiD's two pools, for
cross-pool detector tests). Images stay uint8 (N, 3, S, S) RGB in the cache; trainers divide
by 255 as they do for every other task.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from modelzoo.datasets import ImageSet
from modelzoo.errors import WeightbiasError
from modelzoo.sources import DATA_ENV, user_cache_dir
from modelzoo.tasks import FACE_GROUPS

GROUPS = FACE_GROUPS  # DiveFace's three, as the face_gender task names them
GENDERS = ("male", "female")
LAYOUTS = ("diveface", "fairface", "utkface")
SPLITS = ("pool_a", "pool_b", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TEST_FRACTION = 0.15
CACHE_FORMAT_VERSION = 1

_LAYOUT_HELP = (
    "diveface (sub-folders or lists named Group1_Male … Group3_Female), "
    "fairface (a *.csv with columns file,age,gender,race), "
    "utkface (images named [age]_[gender]_[race]_[datetime].jpg)"
)
_UTK_RACE = {0: 2, 1: 1, 2: 0, 3: 1}  # White, Black, Asian, Indian; 4 (Others) has no group
_UTK_NAME = re.compile(r"\d+_\d+_\d+")
_FAIRFACE_COLUMNS = ("file", "age", "gender", "race")
_FAIRFACE_RACE = {"east asian": 0, "black": 1, "indian": 1, "white": 2}
_FAIRFACE_OTHER = {"southeast asian", "middle eastern", "latino_hispanic"}
_GENDER_WORDS = {"male": 0, "female": 1}
_DIVEFACE_CLASSES = {
    f"Group{group + 1}_{sex}": (gender, group)
    for group in range(len(GROUPS))
    for gender, sex in enumerate(("Male", "Female"))
}


class FaceDataError(WeightbiasError, ValueError):
    """A face folder is missing, has an unknown layout, or cannot yield a balanced split."""


@dataclass(frozen=True)
class FaceRecord:
    """One labelled image: its file, gender (0 male, 1 female), group index, age if known."""

    path: Path
    gender: int
    group: int
    age: int | None


@dataclass
class FaceScan:
    """What a layout reader found: usable records, the layout, and skip counts by reason."""

    records: list[FaceRecord]
    layout: str
    skipped: dict[str, int]


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


def find_face_folder(dataset: str | Path, data_dir: str | Path | None = None) -> Path:
    """Resolve a face dataset: an absolute or existing path as-is, else ``ROOT/faces/<dataset>/``.

    ROOT follows MNIST's lookup (DESIGN §2): ``data_dir``, else ``$WEIGHTBIAS_DATA``, else the
    user cache; an explicit root is the only place looked in, so a typo never silently picks
    another copy.
    """
    path = Path(dataset).expanduser()
    if path.is_absolute():
        if not path.is_dir():
            raise FaceDataError(f"face folder {path} does not exist or is not a folder")
        return path
    if path.is_dir():
        return path.resolve()
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if explicit:
        root = Path(explicit).expanduser()
        where = "--data-dir" if data_dir is not None else f"${DATA_ENV}"
        if not root.is_dir():
            raise FaceDataError(f"{where} points to {root}, which is not a folder")
    else:
        root, where = user_cache_dir(), "the user cache (no --data-dir, no $WEIGHTBIAS_DATA)"
    candidate = root / "faces" / path
    if candidate.is_dir():
        return candidate
    faces = root / "faces"
    available = sorted(p.name for p in faces.iterdir() if p.is_dir()) if faces.is_dir() else []
    raise FaceDataError(
        f"face dataset {str(dataset)!r} not found: looked for {candidate} (data root from {where}) "
        f"and for {path.resolve()}; datasets under {faces}: {', '.join(available) or 'none'}. "
        f"Pass an absolute path, or --data-dir ROOT / ${DATA_ENV}=ROOT with ROOT/faces/<dataset>/"
    )


def detect_layout(folder: str | Path) -> str:
    """Name the layout of ``folder`` (see the module docstring), or raise FaceDataError."""
    folder = _existing_folder(folder)
    if any((folder / name).is_dir() or (folder / f"{name}.txt").is_file() for name in _DIVEFACE_CLASSES):
        return "diveface"
    if _fairface_csvs(folder):
        return "fairface"
    if any(_UTK_NAME.match(path.name) for path in _images_in(folder)):
        return "utkface"
    raise FaceDataError(f"{folder}: unknown face-folder layout; accepted layouts: {_LAYOUT_HELP}")


def scan_faces(folder: str | Path, layout: str = "auto", min_age: int | None = 18) -> FaceScan:
    """Read labels from ``folder`` without decoding images; drop known ages below ``min_age``."""
    folder = _existing_folder(folder)
    if layout not in ("auto", *LAYOUTS):
        raise FaceDataError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if min_age is not None and (not isinstance(min_age, int) or min_age < 0):
        raise FaceDataError(f"min_age must be a non-negative int or None, got {min_age!r}")
    layout = detect_layout(folder) if layout == "auto" else layout
    reader = {"utkface": _read_utkface, "fairface": _read_fairface, "diveface": _read_diveface}[layout]
    skipped: Counter[str] = Counter()
    records = reader(folder, min_age or 0, skipped)
    return FaceScan(records, layout, dict(sorted(skipped.items())))


def group_counts(imageset: ImageSet) -> np.ndarray:
    """Images per cell as a 2×3 table: rows are GENDERS, columns GROUPS."""
    table = np.zeros((len(GENDERS), len(GROUPS)), dtype=np.int64)
    np.add.at(table, (imageset.labels, imageset.bias), 1)
    return table


# ---------------------------------------------------------------- layout readers


def _existing_folder(folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FaceDataError(f"face folder {folder} does not exist or is not a folder")
    return folder


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_utkface(folder: Path, min_age: int, skipped: Counter[str]) -> list[FaceRecord]:
    records = []
    for path in _images_in(folder):
        fields = path.name.split(".", 1)[0].split("_")
        if not all(field.isdigit() for field in fields) or len(fields) not in (3, 4):
            skipped["unparsable name"] += 1
        elif len(fields) == 3:  # age_gender_datetime: UTKFace's few files with no race label
            skipped["no race field"] += 1
        elif int(fields[1]) not in (0, 1):
            skipped["bad gender"] += 1
        elif int(fields[2]) == 4:
            skipped["race other"] += 1
        elif int(fields[2]) not in _UTK_RACE:
            skipped["bad race"] += 1
        elif int(fields[0]) < min_age:
            skipped["under min age"] += 1
        else:
            records.append(FaceRecord(path, int(fields[1]), _UTK_RACE[int(fields[2])], int(fields[0])))
    return records


def _fairface_csvs(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.glob("*.csv")):
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError):
            continue
        if set(_FAIRFACE_COLUMNS) <= {column.strip() for column in header}:
            found.append(path)
    return found


def _age_lower_bound(text: str) -> int | None:
    """FairFace age bins ("0-2", "20-29", "more than 70") or plain years → lower bound."""
    text = text.strip().lower()
    match = re.fullmatch(r"(\d+)(?:\s*-\s*\d+|\+)?", text) or re.fullmatch(r"(?:more than|over) *(\d+)", text)
    return int(match[1]) if match else None


def _read_fairface(folder: Path, min_age: int, skipped: Counter[str]) -> list[FaceRecord]:
    tables = _fairface_csvs(folder)
    if not tables:
        raise FaceDataError(f"{folder}: no label CSV with columns {','.join(_FAIRFACE_COLUMNS)}")
    records, seen = [], set()
    for table in tables:
        with open(table, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh, skipinitialspace=True):
                values = [row.get(column) for column in _FAIRFACE_COLUMNS]
                if any(value is None for value in values) or not values[0].strip():
                    skipped["unreadable row"] += 1
                    continue
                name, age_text, gender_text, race_text = (value.strip() for value in values)
                race, age = race_text.lower(), _age_lower_bound(age_text)
                path = folder / name
                if gender_text.lower() not in _GENDER_WORDS:
                    skipped["bad gender"] += 1
                elif not race:
                    skipped["no race field"] += 1
                elif race in _FAIRFACE_OTHER:
                    skipped[f"race other ({race_text})"] += 1
                elif race not in _FAIRFACE_RACE:
                    skipped["bad race"] += 1
                elif age is None:
                    skipped["bad age"] += 1
                elif age < min_age:
                    skipped["under min age"] += 1
                elif path in seen:
                    skipped["duplicate entry"] += 1
                elif not path.is_file():
                    skipped["missing file"] += 1
                else:
                    seen.add(path)
                    gender = _GENDER_WORDS[gender_text.lower()]
                    records.append(FaceRecord(path, gender, _FAIRFACE_RACE[race], age))
    return records


def _read_diveface(folder: Path, min_age: int, skipped: Counter[str]) -> list[FaceRecord]:
    del min_age  # DiveFace has no ages, so nothing can be dropped for age
    records, seen = [], set()
    for name, (gender, group) in _DIVEFACE_CLASSES.items():
        listing, class_dir = folder / f"{name}.txt", folder / name
        if listing.is_file():
            paths = []
            for line in _list_lines(listing):
                found = next((p for p in (class_dir / line, folder / line) if p.is_file()), None)
                if found is None:
                    skipped["missing file"] += 1
                else:
                    paths.append(found)
        elif class_dir.is_dir():
            paths = sorted(p for p in class_dir.rglob("*")
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            continue
        for path in paths:
            if path in seen:  # one image in two classes would be labelled twice
                skipped["duplicate entry"] += 1
                continue
            seen.add(path)
            records.append(FaceRecord(path, gender, group, None))
    return records


def _list_lines(listing: Path) -> list[str]:
    try:
        text = listing.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise FaceDataError(f"{listing}: cannot read DiveFace annotation list ({err})") from err
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# ---------------------------------------------------------------- preprocessing and cache

_Split = tuple[ImageSet, tuple[str, ...]]  # a split's images and the folder-relative file of each


def load_face_data(folder: str | Path, image_size: int = 48, seed: int = 0, min_age: int | None = 18,
                   cache_dir: str | Path | None = None, layout: str = "auto", *,
                   test_per_cell: int | None = None, progress: bool = True) -> FaceData:
    """Decode, crop, resize and split a face folder once; later calls read the HDF5 cache.

    The cache key covers every argument that changes the result and a fingerprint of the
    scanned files (relative names, sizes, labels), so an edited folder is re-processed. A
    damaged cache file is rebuilt. Unreadable images are skipped and counted.
    """
    folder = _existing_folder(folder)
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
    """Decode every record, drop the unreadable ones, then split: {split: (images, paths)}, skips."""
    images, kept, unreadable = _decode_all(scan.records, image_size, label, progress)
    skipped = dict(sorted((Counter(scan.skipped) + Counter({"unreadable image": unreadable})).items()))
    labels = np.array([scan.records[i].gender for i in kept], dtype=np.int64)
    groups = np.array([scan.records[i].group for i in kept], dtype=np.int64)
    splits = {split: (ImageSet(images[index], labels[index], groups[index]),
                      tuple(relative[kept[i]] for i in index))
              for split, index in _split(labels, groups, test_per_cell, seed).items()}
    return splits, skipped


def _fingerprint(scan: FaceScan, relative: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=8)
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
    gives every group a third whatever ``skew`` says.
    """
    if bias_group not in BIAS_GROUPS:
        raise FaceDataError(f"bias_group must be one of {list(BIAS_GROUPS)}, got {bias_group!r}")
    if not 0 < skew < 1:
        raise FaceDataError(f"skew must lie in (0, 1), got {skew}")
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
