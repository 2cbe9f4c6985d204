"""Face source and dataset stage (DESIGN §2): real UTKFace labels, splits, cache, lookup and
group skew (FairFace and DiveFace folders: test_face_layouts.py)."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from modelzoo.faces import (
    BIAS_GROUPS,
    GROUPS,
    SPLITS,
    TEST_FRACTION,
    FaceData,
    FaceDataError,
    find_face_folder,
    group_counts,
    largest_skewed_size,
    load_face_data,
    scan_faces,
    skewed_subset,
)

# Parsed here independently of modelzoo.faces: age, gender, race, then the datetime stamp.
UTK_NAME = re.compile(r"^(\d+)_([01])_([0-4])_\d+\.jpg\.chip\.jpg$")
UTK_GROUP = {"0": "caucasian", "1": "african_indian", "2": "east_asian", "3": "african_indian"}


def _utk_cell(name: str) -> tuple[int, int]:
    match = UTK_NAME.match(name)
    assert match and match[3] in UTK_GROUP, name
    return int(match[2]), GROUPS.index(UTK_GROUP[match[3]])


# ---------------------------------------------------------------- real UTKFace folder


@pytest.fixture(scope="session")
def utk_folder(data_root: Path) -> Path:
    folder = data_root / "faces" / "utkface_crop_part1"
    assert folder.is_dir(), f"tests need the real UTKFace subset at {folder}"
    return folder


@pytest.fixture(scope="session")
def utk_groups(utk_folder: Path) -> dict[str, np.ndarray]:
    """The real UTKFace adults' group labels, split in two halves like the two training pools
    (a scan of the file names only: the group-skew tests need no pixels)."""
    groups = np.array([record.group for record in scan_faces(utk_folder).records])
    return {"A": groups[::2], "B": groups[1::2]}


@pytest.fixture(scope="session")
def utk_data(utk_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> FaceData:
    """The whole folder at the default 48×48, preprocessed once (about 5 s on one core)."""
    return load_face_data(utk_folder, cache_dir=tmp_path_factory.mktemp("face-cache"), progress=False)


def test_utkface_scan_matches_file_names(utk_folder: Path) -> None:
    names = [p.name for p in utk_folder.iterdir() if p.name.endswith(".jpg")]
    expected_skips, expected_cells = Counter(), Counter()
    for name in names:
        match = UTK_NAME.match(name)
        if match is None:
            assert re.match(r"^\d+_\d+_\d+\.jpg\.chip\.jpg$", name), name
            expected_skips["no race field"] += 1
        elif match[3] == "4":
            expected_skips["race other"] += 1
        elif int(match[1]) < 18:
            expected_skips["under min age"] += 1
        else:
            expected_cells[_utk_cell(name)] += 1
    scan = scan_faces(utk_folder)
    assert scan.layout == "utkface"
    assert scan.skipped == dict(expected_skips)
    assert scan.skipped["no race field"] == 2 and scan.skipped["race other"] == 1103  # SOURCE.md
    assert len(scan.records) + sum(scan.skipped.values()) == len(names) == 9780
    for record in scan.records:
        assert (record.gender, record.group) == _utk_cell(record.path.name)
        assert record.age == int(record.path.name.split("_")[0]) >= 18
    assert Counter((r.gender, r.group) for r in scan.records) == expected_cells
    assert len(expected_cells) == 6


def test_min_age_zero_keeps_children(utk_folder: Path) -> None:
    scan = scan_faces(utk_folder, min_age=0)
    assert "under min age" not in scan.skipped
    assert len(scan.records) == 9780 - 2 - 1103
    assert min(r.age for r in scan.records) < 5


@pytest.mark.slow  # decodes all 8,600 faces once (utk_data)
def test_utkface_splits_are_disjoint_balanced_and_labelled(utk_folder: Path, utk_data: FaceData) -> None:
    scan = scan_faces(utk_folder)
    # every real image decodes; UTKFace holds a file under several names: one copy is kept
    copies = {"copy of another file": 44, "copies of one file with conflicting labels": 6}
    assert utk_data.skipped == {**scan.skipped, **copies}
    names = {split: set(utk_data.paths[split]) for split in SPLITS}
    assert not names["pool_a"] & names["pool_b"]
    assert not names["test"] & (names["pool_a"] | names["pool_b"])
    assert len(names["pool_a"] | names["pool_b"] | names["test"]) == len(scan.records) - 50
    pixels = [image.tobytes() for split in SPLITS for image in getattr(utk_data, split).images]
    assert len(set(pixels)) == len(pixels)  # no face is in two splits, under any name
    cells = Counter((r.gender, r.group) for r in scan.records)
    per_cell = int(TEST_FRACTION * min(cells.values()))
    assert per_cell > 10
    np.testing.assert_array_equal(group_counts(utk_data.test), np.full((2, 3), per_cell))
    a, b = group_counts(utk_data.pool_a), group_counts(utk_data.pool_b)
    assert np.abs(a - b).max() <= 1, (a, b)
    for split in SPLITS:
        imageset = getattr(utk_data, split)
        assert imageset.images.shape == (len(imageset), 3, 48, 48) and imageset.images.dtype == np.uint8
        assert imageset.labels.dtype == imageset.bias.dtype == np.int64
        assert len(utk_data.paths[split]) == len(imageset)
        from_names = np.array([_utk_cell(name) for name in utk_data.paths[split]])
        np.testing.assert_array_equal(from_names[:, 0], imageset.labels)
        np.testing.assert_array_equal(from_names[:, 1], imageset.bias)


@pytest.mark.slow  # decodes all 8,600 faces once (utk_data)
def test_utkface_pixels_follow_the_file(utk_folder: Path, utk_data: FaceData) -> None:
    """Each cached image is its own file, channels first, not flipped or transposed."""
    for index in (0, 50, 150):
        name = utk_data.paths["test"][index]
        with Image.open(utk_folder / name) as img:  # 200×200: no crop, a plain area resize
            reference = np.asarray(img.convert("RGB").resize((48, 48), Image.Resampling.BOX), float)
        ours = utk_data.test.images[index].astype(float)
        assert np.abs(ours - reference.transpose(2, 0, 1)).mean() < 8
        assert np.abs(ours - reference.transpose(2, 1, 0)).mean() > 15  # a transposed face differs


# ---------------------------------------------------------------- cache (a real 60-image subset)


@pytest.fixture
def utk_subset(utk_folder: Path, tmp_path: Path) -> Path:
    """Ten real adults per cell plus one 'Others', one child and one race-less file."""
    folder = tmp_path / "utk_subset"
    folder.mkdir()
    taken = Counter()
    for path in sorted(utk_folder.glob("*.jpg")):
        match = UTK_NAME.match(path.name)
        if match is None or match[3] == "4":
            kind = "race-less" if match is None else "other"
        else:
            kind = _utk_cell(path.name) if int(match[1]) >= 18 else "child"
        if taken[kind] < (10 if isinstance(kind, tuple) else 1):
            taken[kind] += 1
            shutil.copy(path, folder)
    assert sum(taken.values()) == 63
    return folder


def test_cache_is_hit_then_rebuilt_when_damaged(utk_subset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
    assert first.skipped == {"no race field": 1, "race other": 1, "under min age": 1}
    assert sum(len(getattr(first, s)) for s in SPLITS) == 60
    np.testing.assert_array_equal(group_counts(first.test), np.ones((2, 3)))  # 15% of 10 → 1
    assert first.cache_file.parent == cache / "datasets" and h5py.is_hdf5(first.cache_file)
    stamp = first.cache_file.stat().st_mtime_ns

    second = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
    assert second.cache_file == first.cache_file and first.cache_file.stat().st_mtime_ns == stamp
    assert second.paths == first.paths and second.skipped == first.skipped
    for split in SPLITS:
        np.testing.assert_array_equal(getattr(second, split).images, getattr(first, split).images)
    # Read from the file, not decoded again: a sentinel (gender 7, which no image has) comes back.
    intact = first.cache_file.read_bytes()
    with h5py.File(first.cache_file, "r+") as h5:
        h5["pool_a/labels"][0] = 7
    marked = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
    assert marked.pool_a.labels[0] == 7
    np.testing.assert_array_equal(marked.pool_a.labels[1:], first.pool_a.labels[1:])
    first.cache_file.write_bytes(intact)

    for damage in (b"not an HDF5 file", intact[: len(intact) // 2]):
        first.cache_file.write_bytes(damage)
        rebuilt = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
        assert h5py.is_hdf5(first.cache_file) and first.cache_file.stat().st_size == len(intact)
        assert rebuilt.paths == first.paths
        np.testing.assert_array_equal(rebuilt.pool_b.images, first.pool_b.images)
    assert not list((cache / "datasets").glob("*.tmp")), "temporary files must not be left behind"


def test_changed_folder_or_seed_gets_a_new_cache(utk_subset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    base = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
    reseeded = load_face_data(utk_subset, image_size=16, seed=1, cache_dir=cache, progress=False)
    assert reseeded.cache_file != base.cache_file and reseeded.paths["test"] != base.paths["test"]
    gone = base.paths["pool_a"][0]
    (utk_subset / gone).unlink()
    changed = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
    assert changed.cache_file != base.cache_file
    assert all(gone not in changed.paths[s] for s in SPLITS)
    assert sum(len(changed.paths[s]) for s in SPLITS) == 59
    # Same names, new content (a size change): re-processed, and the new pixels are served.
    target, donor = changed.paths["pool_b"][0], changed.paths["pool_b"][1]
    (utk_subset / target).write_bytes((utk_subset / donor).read_bytes() + b"\0" * 7)
    edited = load_face_data(utk_subset, image_size=16, cache_dir=cache, progress=False)
    assert edited.cache_file != changed.cache_file and edited.paths == changed.paths
    np.testing.assert_array_equal(edited.pool_b.images[0], changed.pool_b.images[1])


def test_unreadable_image_is_skipped_and_counted(utk_subset: Path, tmp_path: Path) -> None:
    broken = "35_1_0_20170104000000000.jpg.chip.jpg"
    (utk_subset / broken).write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    data = load_face_data(utk_subset, image_size=16, cache_dir=tmp_path / "cache", progress=False)
    assert data.skipped["unreadable image"] == 1
    assert all(broken not in data.paths[s] for s in SPLITS)
    assert sum(len(data.paths[s]) for s in SPLITS) == 60


# ---------------------------------------------------------------- lookup


def test_find_face_folder_follows_the_data_root(data_root: Path, utk_folder: Path, tmp_path: Path) -> None:
    assert find_face_folder("utkface_crop_part1") == utk_folder  # $WEIGHTBIAS_DATA, set by conftest
    assert find_face_folder("utkface_crop_part1", data_dir=data_root) == utk_folder
    assert find_face_folder(tmp_path) == tmp_path
    with pytest.raises(FaceDataError) as err:
        find_face_folder("no_such_faces")
    message = str(err.value)
    assert str(data_root / "faces" / "no_such_faces") in message and "utkface_crop_part1" in message
    with pytest.raises(FaceDataError, match=r"datasets under .*: none"):
        find_face_folder("utkface_crop_part1", data_dir=tmp_path)
    with pytest.raises(FaceDataError, match="not a folder"):
        find_face_folder("utkface_crop_part1", data_dir=tmp_path / "missing-root")
    with pytest.raises(FaceDataError, match="does not exist"):
        find_face_folder(tmp_path / "missing")


# ---------------------------------------------------------------- group skew


@pytest.mark.parametrize(("bias_group", "expected"), [
    ("east_asian", [0.8, 0.1, 0.1]), ("caucasian", [0.1, 0.1, 0.8]), ("balanced", [1 / 3] * 3)])
def test_skewed_subset_follows_the_group_shares(utk_groups: dict, bias_group: str, expected: list) -> None:
    groups = utk_groups["A"]
    size = largest_skewed_size(groups, 0.8)
    assert size > 100
    subset = skewed_subset(groups, bias_group, 0.8, size, seed=1)
    assert len(subset) == size == len(np.unique(subset))
    shares = np.bincount(groups[subset], minlength=3) / size
    assert np.allclose(shares, expected, atol=2 / size)
    assert not np.array_equal(subset, skewed_subset(groups, bias_group, 0.8, size, seed=2))


def test_skew_one_trains_on_the_favoured_group_alone(utk_groups: dict) -> None:
    groups = utk_groups["A"]
    size = largest_skewed_size(groups, 1.0)
    assert size == np.bincount(groups, minlength=3).min()
    subset = skewed_subset(groups, "african_indian", 1.0, size, seed=0)
    assert np.bincount(groups[subset], minlength=3).tolist() == [0, size, 0]
    with pytest.raises(FaceDataError, match=r"skew must lie in \(0, 1\]"):
        skewed_subset(groups, "caucasian", 1.01, size, seed=0)


def test_largest_skewed_size_fits_every_bias_group_and_no_more(utk_groups: dict) -> None:
    groups = utk_groups["B"]
    size = largest_skewed_size(groups, 0.9)
    for bias_group in BIAS_GROUPS:
        skewed_subset(groups, bias_group, 0.9, size, seed=0)
    with pytest.raises(FaceDataError, match=r"east_asian images but bias_group='east_asian'.*train_size"):
        skewed_subset(groups, "east_asian", 0.9, size + 5, seed=0)
    with pytest.raises(FaceDataError, match="bias_group must be one of"):
        skewed_subset(groups, "martian", 0.9, 10, seed=0)
