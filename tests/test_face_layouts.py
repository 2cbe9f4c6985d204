"""Face folders of the other layouts (DESIGN §2): FairFace's label CSVs and DiveFace's class
folders and lists, read, cropped and labelled like UTKFace; a folder of no known layout is
explained. The images are solid JPEGs written here, one colour per (gender, group) cell, so a
loaded image's colour says which labels it must carry."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modelzoo.faces import GENDERS, GROUPS, SPLITS, FaceDataError, group_counts, load_face_data, scan_faces


def _jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (24, 24)) -> None:
    """A solid image; taller than wide ones get red 8-px bands that a centre crop must remove."""
    width, height = size
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = (255, 0, 0)
    top = (height - min(size)) // 2
    left = (width - min(size)) // 2
    pixels[top : top + min(size), left : left + min(size)] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95, subsampling=0)  # 4:4:4 so bands do not bleed


def _cell_color(gender: int, group: int) -> tuple[int, int, int]:
    return (40 + 150 * gender, 30 + 90 * group, 120)


def _colors_match_labels(imageset) -> bool:
    """Each image's mean colour must be its own cell's colour: images travel with their labels."""
    expected = np.array([_cell_color(g, k) for g, k in zip(imageset.labels, imageset.bias, strict=True)])
    return bool(np.abs(imageset.images.mean(axis=(2, 3)) - expected).max() < 4)


@pytest.fixture
def fairface_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "fairface"
    rows = []
    kept_race = {0: ["East Asian"] * 3, 1: ["Black", "Indian", "Black"], 2: ["White"] * 3}
    for gender, word in enumerate(("Male", "Female")):
        for group, races in kept_race.items():
            for i, (race, age) in enumerate(zip(races, ("20-29", "30-39", "more than 70"), strict=True)):
                name = f"train/{word.lower()}_{group}_{i}.jpg"
                size = (24, 40) if i == 0 else (40, 22 + 2 * i)  # one size each: no two files alike
                _jpeg(folder / name, _cell_color(gender, group), size=size)
                rows.append([name, age, word, race, "True"])
    skipped_rows = [
        ("se.jpg", "20-29", "Male", "Southeast Asian"), ("lh.jpg", "20-29", "Female", "Latino_Hispanic"),
        ("me.jpg", "40-49", "Male", "Middle Eastern"), ("baby.jpg", "0-2", "Female", "White"),
        ("teen.jpg", "10-19", "Male", "Black"), ("x.jpg", "20-29", "Unknown", "White"),
        ("norace.jpg", "20-29", "Male", ""), ("alien.jpg", "20-29", "Male", "Martian"),
        ("agex.jpg", "old", "Male", "White"),
    ]
    for name, age, gender, race in skipped_rows:
        _jpeg(folder / "train" / name, (9, 9, 9))
        rows.append([f"train/{name}", age, gender, race, "True"])
    rows.append(["train/absent.jpg", "30-39", "Female", "Indian", "False"])
    with open(folder / "fairface_label_train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "age", "gender", "race", "service_test"])
        writer.writerows(rows)
    with open(folder / "fairface_label_val.csv", "w", newline="") as fh:
        fh.write("file,age,gender,race,service_test\ntrain/male_0_0.jpg,20-29,Male,East Asian,True\n"
                 "train/short.jpg,20-29\n")
    (folder / "notes.csv").write_text("a,b\n1,2\n")  # not a label table: ignored
    return folder


def test_fairface_mapping_and_skip_reasons(fairface_folder: Path) -> None:
    scan = scan_faces(fairface_folder)
    assert scan.layout == "fairface"
    assert scan.skipped == {
        "race other (Southeast Asian)": 1, "race other (Latino_Hispanic)": 1,
        "race other (Middle Eastern)": 1, "under min age": 2, "bad gender": 1, "no race field": 1,
        "bad race": 1, "bad age": 1, "missing file": 1, "duplicate entry": 1, "unreadable row": 1,
    }
    assert len(scan.records) == 18
    for record in scan.records:
        gender_word, group, _ = record.path.stem.split("_")
        assert record.gender == GENDERS.index(gender_word) and record.group == int(group)
        assert record.path == fairface_folder / "train" / record.path.name
    ages = Counter(r.age for r in scan.records)
    assert ages == {20: 6, 30: 6, 70: 6}
    indian = next(r for r in scan.records if r.path.name == "male_1_1.jpg")
    assert GROUPS[indian.group] == "african_indian"
    assert len(scan_faces(fairface_folder, min_age=0).records) == 20  # the two young ones come back


def test_fairface_preprocessing_crops_and_keeps_labels(fairface_folder: Path, tmp_path: Path) -> None:
    data = load_face_data(fairface_folder, image_size=16, test_per_cell=1, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(group_counts(data.test), np.ones((2, 3)))
    np.testing.assert_array_equal(group_counts(data.pool_a), np.ones((2, 3)))
    np.testing.assert_array_equal(group_counts(data.pool_b), np.ones((2, 3)))
    for split in SPLITS:
        imageset = getattr(data, split)
        assert imageset.images.shape == (6, 3, 16, 16)
        assert _colors_match_labels(imageset), "red crop bands leaked in, or images lost their labels"
    with pytest.raises(FaceDataError, match="at least 4 images"):
        load_face_data(fairface_folder, image_size=16, test_per_cell=2, cache_dir=tmp_path, progress=False)


def test_diveface_class_folders_and_lists(tmp_path: Path) -> None:
    folder = tmp_path / "diveface"
    for name, gender, group in (("Group1_Male", 0, 0), ("Group1_Female", 1, 0),
                                ("Group2_Male", 0, 1), ("Group3_Female", 1, 2)):
        for side, (ident, image) in enumerate((("1@N01_identity_0", "a.jpg"), ("1@N01_identity_0", "b.jpg"),
                                               ("2@N02_identity_3", "c.jpg")), start=24):
            # one size each: identical files would count as one face
            _jpeg(folder / name / ident / image, _cell_color(gender, group), size=(side, side))
    (folder / "Group1_Male" / "1@N01_identity_0" / "readme.txt").write_text("not an image")
    # Group2_Female: a list resolved inside its class folder; Group3_Male: a list into a MegaFace tree.
    for side, image in enumerate(("x.jpg", "y.jpg", "z.jpg"), start=24):
        _jpeg(folder / "Group2_Female" / "9@N09_identity_1" / image, _cell_color(1, 1), size=(side, side))
        _jpeg(folder / "7@N07_identity_2" / image, _cell_color(0, 2), size=(side, side))
    (folder / "Group2_Female.txt").write_text(
        "9@N09_identity_1/x.jpg\n9@N09_identity_1/y.jpg\n\n9@N09_identity_1/z.jpg\n9@N09_identity_1/gone.jpg\n")
    (folder / "Group3_Male.txt").write_text("".join(f"7@N07_identity_2/{i}.jpg\n" for i in "xyz"))
    (folder / "Group1_Male_balanced.txt").write_text("1@N01_identity_0/a.jpg\n")  # a subset: ignored

    scan = scan_faces(folder)  # default min_age=18 must not drop DiveFace's age-less images
    assert scan.layout == "diveface"
    assert scan.skipped == {"missing file": 1}
    assert len(scan.records) == 18 and all(r.age is None for r in scan.records)
    cells = Counter((GENDERS[r.gender], GROUPS[r.group]) for r in scan.records)
    assert cells == {(g, k): 3 for g in GENDERS for k in GROUPS}
    megaface = [r for r in scan.records if r.path.parent.name == "7@N07_identity_2"]
    assert {(r.gender, r.group) for r in megaface} == {(0, 2)}

    data = load_face_data(folder, image_size=16, test_per_cell=1, cache_dir=tmp_path / "c", progress=False)
    assert all(_colors_match_labels(getattr(data, split)) for split in SPLITS)


# ---------------------------------------------------------------- errors


def test_unknown_layout_and_missing_folder_are_explained(tmp_path: Path) -> None:
    odd = tmp_path / "holiday"
    _jpeg(odd / "beach.jpg", (1, 2, 3))
    (odd / "notes.txt").write_text("hello")
    with pytest.raises(FaceDataError, match="unknown face-folder layout") as err:
        scan_faces(odd)
    assert str(odd) in str(err.value)
    assert all(layout in str(err.value) for layout in ("diveface", "fairface", "utkface"))
    with pytest.raises(FaceDataError, match="does not exist"):
        load_face_data(tmp_path / "nowhere", cache_dir=tmp_path)
    with pytest.raises(FaceDataError, match="layout must be"):
        scan_faces(odd, layout="celeba")
    with pytest.raises(FaceDataError, match="no label CSV"):
        scan_faces(odd, layout="fairface")
    with pytest.raises(FaceDataError, match="no usable utkface"):
        load_face_data(odd, layout="utkface", cache_dir=tmp_path)
