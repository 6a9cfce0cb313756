"""The data stage: readers, validation, de-duplication, split, prepare and its cache."""

from __future__ import annotations

import gzip
import hashlib
import json

import cv2
import numpy as np
import pytest

from faceattrs.cli import main
from faceattrs.data import DataError, read_faces
from faceattrs.dedup import find_duplicates
from faceattrs.prepare import PrepareConfig, load_faces, load_prepared, prepare, read_csv_unsplit

HEADER = "age,ethnicity,gender,img_name,pixels"


def pix(img: np.ndarray) -> str:
    return " ".join(map(str, img.ravel().tolist()))


def distinct_faces(n: int, seed: int = 0) -> np.ndarray:
    """Random smooth-ish faces, far from each other in cosine terms."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 48, 48)).astype(np.uint8)


def write_csv(path, rows, header=HEADER, gz=False):
    text = header + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.fixture
def planted(tmp_path):
    """100 distinct faces + 3 exact copies + 2 near copies (one with a different gender)."""
    imgs = distinct_faces(100)
    rows = [(20 + i % 50, i % 5, (i // 5) % 2, f"f{i}.jpg", pix(im)) for i, im in enumerate(imgs)]
    rows.append((20, 0, 0, "copy0.jpg", pix(imgs[0])))  # exact, same labels
    rows.append((25, 1, 0, "copy1.jpg", pix(imgs[1])))  # exact, age differs -> conflict
    rows.append((20, 0, 0, "copy0b.jpg", pix(imgs[0])))  # exact again: group of 3
    near = np.clip(imgs[2].astype(int) + 3, 0, 255).astype(np.uint8)
    rows.append((22, 2, 1, "near2.jpg", pix(near)))  # near copy of row 2 (gender differs)
    near3 = imgs[3].copy()
    near3[0, :10] = 255 - near3[0, :10]  # ten pixels inverted: cosine about 0.99
    rows.append((23, 3, 1, "near3.jpg", pix(near3)))
    return write_csv(tmp_path / "faces.csv.gz", rows, gz=True), imgs


def test_reads_plain_and_gzip_with_free_column_order(tmp_path):
    imgs = distinct_faces(3)
    rows = [(f"x{i}", pix(im), i % 2, i, 30 + i, "extra") for i, im in enumerate(imgs)]
    path = write_csv(tmp_path / "a.csv", rows, header="img_name,pixels,gender,ethnicity,age,note")
    raw = read_faces(path)
    assert np.array_equal(raw.images, imgs)
    assert raw.age.tolist() == [30, 31, 32] and raw.gender.tolist() == [0, 1, 0]
    assert raw.lines.tolist() == [2, 3, 4]
    gz = tmp_path / "a.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert np.array_equal(read_faces(gz).images, imgs)


def test_quoted_pixels_are_read(tmp_path):
    img = distinct_faces(1)[0]
    path = tmp_path / "q.csv"
    path.write_text(f'{HEADER}\n26,0,1,a.jpg,"{pix(img)}"\n')
    assert np.array_equal(read_faces(path).images[0], img)


GOOD = pix(distinct_faces(1)[0])


@pytest.mark.parametrize(
    "row, column, words",
    [
        ((30, 0, 0, "a", " ".join(["1"] * 2303)), "pixels", "2303 pixel values"),
        ((30, 0, 0, "a", GOOD.replace(" ", " 1.5 ", 1)), "pixels", "non-integer"),
        ((30, 0, 0, "a", "256 " + GOOD.split(" ", 1)[1]), "pixels", "256 outside 0..255"),
        ((30, 0, 0, "a", "-3 " + GOOD.split(" ", 1)[1]), "pixels", "-3 outside 0..255"),
        ((30, 0, 2, "a", GOOD), "gender", "2 is outside 0..1"),
        ((30, 5, 0, "a", GOOD), "ethnicity", "5 is outside 0..4"),
        ((0, 0, 0, "a", GOOD), "age", "0 is outside 1..120"),
        ((121, 0, 0, "a", GOOD), "age", "outside"),
        (("", 0, 0, "a", GOOD), "age", "missing value"),
        (("abc", 0, 0, "a", GOOD), "age", "not an integer"),
    ],
)
def test_bad_rows_name_file_line_and_column(tmp_path, row, column, words):
    path = write_csv(tmp_path / "bad.csv", [(30, 0, 0, "ok", GOOD), row])
    with pytest.raises(DataError) as e:
        read_faces(path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and f"column '{column}'" in msg and words in msg
    raw = read_faces(path, on_bad_row="skip")
    assert len(raw.images) == 1 and raw.rows_read == 2 and sum(raw.invalid.values()) == 1


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty file"),
        (b"age,gender,img_name,pixels\n1,0,a,1 2\n", r"missing column\(s\) ethnicity"),
        (HEADER.encode() + b"\n", "no data rows"),
        (gzip.compress((HEADER + "\n30,0,0,a," + GOOD + "\n").encode())[:-20], "truncated"),
    ],
)
def test_bad_files(tmp_path, content, words):
    path = tmp_path / ("f.csv.gz" if content[:2] == b"\x1f\x8b" else "f.csv")
    path.write_bytes(content)
    with pytest.raises(DataError, match=words):
        read_faces(path)


def test_cli_bad_input_exit_status_and_nothing_written(tmp_path, capsys):
    path = write_csv(tmp_path / "bad.csv", [(30, 0, 7, "a", GOOD)])
    out = tmp_path / "out"
    assert main(["prepare", "--data", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "gender" in err
    assert not out.exists()


def test_dedup_finds_planted_copies(planted):
    path, imgs = planted
    raw = read_faces(path)
    d = find_duplicates(
        raw.images, {"age": raw.age, "gender": raw.gender, "ethnicity": raw.ethnicity}
    )
    assert sorted(np.flatnonzero(d.kind == "exact").tolist()) == [100, 101, 102]
    assert sorted(np.flatnonzero(d.kind == "near").tolist()) == [103, 104]
    assert d.rep[102] == 0 and d.rep[103] == 2 and d.rep[104] == 3
    assert len(d.keep) == 100
    # conflicts: group of row 1 (age), groups of rows 2 and 3 (gender)
    assert sorted(d.conflict_groups.tolist()) == [1, 2, 3]
    assert d.conflict_fields == {"age": 1, "gender": 2, "ethnicity": 0}


def test_prepare_report_split_and_cache(planted, tmp_path):
    path, _ = planted
    out = tmp_path / "prep"
    rep = prepare(path, out)
    assert rep["rows_read"] == 105 and rep["exact_removed"] == 3 and rep["near_removed"] == 2
    assert rep["conflicting_groups"] == 3 and rep["rows_kept"] == 100
    assert sum(rep["split_sizes"].values()) == 100
    for f in (
        "faces.npz",
        "dedup_report.json",
        "removed.csv",
        "label_distribution.png",
        "duplicate_pairs.png",
    ):
        assert (out / f).exists(), f
    assert len((out / "removed.csv").read_text().strip().splitlines()) == 1 + 5
    before = (out / "faces.npz").stat().st_mtime_ns
    prepare(path, out)  # cache hit: nothing rewritten
    assert (out / "faces.npz").stat().st_mtime_ns == before
    dropped = prepare(path, tmp_path / "drop", PrepareConfig(on_conflict="drop"))
    assert dropped["rows_kept"] == 97


def test_split_deterministic_stratified_and_disjoint(tmp_path):
    rng = np.random.default_rng(1)
    n = 1000
    imgs = distinct_faces(n, seed=3)
    rows = [
        (int(rng.integers(1, 90)), i % 5, (i // 5) % 2, f"f{i}", pix(im))
        for i, im in enumerate(imgs)
    ]
    # copies planted among them, as the real data has: exact ones and near ones (brighter;
    # a few pixels inverted) of 60 faces, some with other labels; written after the
    # originals, so that a split made before de-duplication would scatter them
    copies = []
    for k, i in enumerate(range(0, 600, 10)):
        age, eth, gender = rows[i][:3]
        if k % 3 == 0:
            img = imgs[i]
        elif k % 3 == 1:
            img = np.clip(imgs[i].astype(int) + 3, 0, 255).astype(np.uint8)
        else:
            img = imgs[i].copy()
            img[0, :10] = 255 - img[0, :10]
        copies.append((age if k % 4 else age + 1, eth, gender, f"copy{k}", pix(img)))
    path = write_csv(tmp_path / "big.csv", rows + copies)
    a = load_prepared(tmp_path / "a") if prepare(path, tmp_path / "a") else None
    b = load_faces(tmp_path / "a")
    c = load_prepared(tmp_path / "c") if prepare(path, tmp_path / "c") else None
    assert np.array_equal(a.split, c.split) and np.array_equal(a.split, b.split)
    frac = np.bincount(a.split, minlength=3) / n
    assert np.allclose(frac, [0.8, 0.1, 0.1], atol=0.01)
    for e in range(5):  # stratified: every ethnicity keeps the ratios
        f = np.bincount(a.split[a.ethnicity == e], minlength=3) / np.sum(a.ethnicity == e)
        assert np.allclose(f, [0.8, 0.1, 0.1], atol=0.02)
    assert len(a) == n and sorted(a.names.tolist()) == sorted(r[3] for r in rows)  # copies out
    hashes = [
        set(hashlib.sha1(im.tobytes()).hexdigest() for im in a.images[a.split == s])
        for s in range(3)
    ]
    assert (
        not (hashes[0] & hashes[1]) and not (hashes[0] & hashes[2]) and not (hashes[1] & hashes[2])
    )
    # no exact or near pair among the kept faces, so none straddles two splits
    labels = {"age": a.age, "gender": a.gender, "ethnicity": a.ethnicity}
    assert len(find_duplicates(a.images, labels).keep) == n
    # (the check itself sees the planted copies)
    every = read_faces(path)
    d = find_duplicates(every.images, {"age": every.age})
    assert len(d.keep) == n and (d.kind == "exact").sum() == 20 and (d.kind == "near").sum() == 40
    other = prepare(path, tmp_path / "d", PrepareConfig(seed=5))
    assert other["rows_kept"] == n
    assert not np.array_equal(load_prepared(tmp_path / "d").split, a.split)


def test_photo_folder_reader(tmp_path):
    imgs = distinct_faces(3)
    for i, im in enumerate(imgs):
        big = cv2.resize(im, (192, 192), interpolation=cv2.INTER_NEAREST)  # 4x: area-down is exact
        colour = cv2.merge([big, big, big])
        cv2.imwrite(str(tmp_path / f"{30 + i}_{i % 2}_{i}_2017.png"), colour)
    cv2.imwrite(str(tmp_path / "holiday.png"), colour)  # no labels in the name
    raw = read_faces(tmp_path)
    assert raw.age.tolist() == [30, 31, 32] and raw.ethnicity.tolist() == [0, 1, 2]
    assert raw.invalid["unlabelled photo name"] == 1 and raw.rows_read == 4
    assert np.abs(raw.images.astype(int) - imgs.astype(int)).max() <= 1


def test_unsplit_reader_keeps_every_row(planted):
    path, _ = planted
    faces = read_csv_unsplit(path)
    assert len(faces) == 105 and set(faces.split.tolist()) == {-1}


@pytest.mark.slow
def test_prepare_shared_file(shared_csv, tmp_path):
    rep = prepare(shared_csv, tmp_path / "p")
    assert rep["rows_read"] == 20253 and rep["rows_invalid"] == 0
    removed = rep["exact_removed"] + rep["near_removed"]
    assert 700 <= removed <= 900, removed  # README of the data: about 800 surplus rows
    assert rep["exact_removed"] > 0 and rep["near_removed"] > 0
    faces = load_prepared(tmp_path / "p")
    assert len(faces) == rep["rows_kept"] == 20253 - removed
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["key"]
