"""Face folders: find a face dataset and read its labels (UTKFace, FairFace, DiveFace layouts).

The source stage of the face task (**source** → dataset → trainer → store → detector): these
readers only read labels from file names, a CSV or annotation lists and never open an image;
:func:`modelzoo.faces.load_face_data` decodes what they list.

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
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from modelzoo.errors import WeightbiasError
from modelzoo.sources import DATA_ENV, user_cache_dir
from modelzoo.tasks import FACE_GROUPS

GROUPS = FACE_GROUPS  # DiveFace's three, as the face_gender task names them
GENDERS = ("male", "female")
LAYOUTS = ("diveface", "fairface", "utkface")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
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
    folder = existing_folder(folder)
    if any((folder / name).is_dir() or (folder / f"{name}.txt").is_file() for name in _DIVEFACE_CLASSES):
        return "diveface"
    if _fairface_csvs(folder):
        return "fairface"
    if any(_UTK_NAME.match(path.name) for path in _images_in(folder)):
        return "utkface"
    raise FaceDataError(f"{folder}: unknown face-folder layout; accepted layouts: {_LAYOUT_HELP}")


def scan_faces(folder: str | Path, layout: str = "auto", min_age: int | None = 18) -> FaceScan:
    """Read labels from ``folder`` without decoding images; drop known ages below ``min_age``."""
    folder = existing_folder(folder)
    if layout not in ("auto", *LAYOUTS):
        raise FaceDataError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if min_age is not None and (not isinstance(min_age, int) or min_age < 0):
        raise FaceDataError(f"min_age must be a non-negative int or None, got {min_age!r}")
    layout = detect_layout(folder) if layout == "auto" else layout
    reader = {"utkface": _read_utkface, "fairface": _read_fairface, "diveface": _read_diveface}[layout]
    skipped: Counter[str] = Counter()
    records = reader(folder, min_age or 0, skipped)
    return FaceScan(records, layout, dict(sorted(skipped.items())))


def existing_folder(folder: str | Path) -> Path:
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


