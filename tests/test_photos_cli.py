"""``gpu-dsm index`` a folder of photos, ``gpu-dsm search`` it with a crop of one of them."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from gpu_dsm.cli import main

#: 20 photos at 192 px, one scale: seconds on the CPU
SMALL = ["--image-size", "192", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def photo_index(mini, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    photos = []
    for i, name in enumerate(mini.imlist[:20]):
        target = (folder / "more" if i % 2 else folder) / f"{name}.jpg"
        shutil.copy(mini.image_path(name), target)
        photos.append(target)
    (folder / "notes.txt").write_text("not a photo: left alone")
    out = tmp_path_factory.mktemp("index") / "my-index"
    assert main(["index", str(folder), "--out", str(out), *SMALL]) == 0
    return {"folder": folder, "photos": photos, "out": out}


def test_a_cropped_photo_finds_itself_first_with_its_inliers(photo_index, capsys):
    capsys.readouterr()
    photo = photo_index["photos"][7]
    box = ["150", "100", "850", "600"]
    assert main(["search", str(photo_index["out"]), str(photo), "--box", *box, "--top", "5", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("global+dsm ranking for") and lines[1].split() == ["rank", "score", "inliers", "path"]
    assert len(lines) == 2 + 5
    rank, score, inliers, path = lines[2].split()
    assert rank == "1" and path == str(photo.resolve()) and int(inliers) > 0
    assert main(["search", str(photo_index["out"]), str(photo), "--box", *box, "--json", "--device", "cpu"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["method"] == "global+dsm" and found["box"] == [float(v) for v in box] and len(found["results"]) == 10
    first = found["results"][0]
    assert first["path"] == str(photo.resolve()) and first["inliers"] == int(inliers) and first["rank"] == 1
    scores = [r["score"] for r in found["results"]]
    assert all(-1.0 <= s <= 1.0 + 1e-6 for s in scores)
    # every indexed photo (both folders, no text file) is in the index
    assert main(["search", str(photo_index["out"]), str(photo), "--top", "100", "--json", "--device", "cpu"]) == 0
    paths = {r["path"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert paths == {str(p.resolve()) for p in photo_index["photos"]}


def _fails(argv, capsys, match: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err


def test_bad_paths_and_non_images_are_one_line_errors(photo_index, tmp_path, capsys):
    out, photo = str(photo_index["out"]), str(photo_index["photos"][0])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    _fails(["search", out, str(tmp_path / "missing.jpg")], capsys, "query not found")
    _fails(["search", out, str(text)], capsys, f"query {text} is not an image")
    _fails(["search", str(tmp_path / "no-index"), photo], capsys, "saved retrieval not found")
    _fails(["search", str(tmp_path), photo], capsys, "is not a saved gpu_dsm retrieval")
    _fails(["search", out, photo, "--box", "0", "0", "0", "0"], capsys, "is empty")
    _fails(["index", str(tmp_path / "no-folder"), "--out", str(tmp_path / "i"), *SMALL], capsys, "folder not found")
    _fails(["index", str(tmp_path), "--out", str(tmp_path / "i"), *SMALL], capsys, f"image {text} is not an image")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["index", str(empty), "--out", str(tmp_path / "i"), *SMALL], capsys, "no images in")
    assert not (tmp_path / "i").exists()


def test_an_interrupted_index_resumes_and_gives_the_same_index(mini, tmp_path):
    """A photo that fails half-way (its header reads, its pixels are cut) stops the run; the
    images finished before it are kept, and the same call after the photo is fixed describes only
    the rest and saves the index a run in one go saves."""
    from gpu_dsm.extract import ExtractConfig
    from gpu_dsm.photos import index_folder
    from gpu_dsm.pipeline import RetrievalConfig

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in mini.imlist[:6]:
        shutil.copy(mini.image_path(name), folder / f"{name}.jpg")
    whole = mini.image_path(mini.imlist[6]).read_bytes()
    (folder / "zzz.jpg").write_bytes(whole[:len(whole) // 3])
    config = RetrievalConfig(extract=ExtractConfig(image_size=128, scales=(1.0,), progress=False))
    lines: list[str] = []
    with pytest.raises(ValueError, match="zzz.jpg"):
        index_folder(folder, tmp_path / "index", config=config, log=lines.append)
    assert not (tmp_path / "index").exists()
    (folder / "zzz.jpg").write_bytes(whole)
    index_folder(folder, tmp_path / "index", config=config, log=lines.append)
    resumed = [line for line in lines if "resuming an interrupted write" in line]
    done = re.search(r"(\d+) of 7 images already done", resumed[0]) if len(resumed) == 1 else None
    assert done and 1 <= int(done.group(1)) <= 6, lines
    index_folder(folder, tmp_path / "in-one-go", config=config, log=lambda line: None)
    for part in ("global.npy", "local/local_xy.npy", "local/local_count.npy"):
        assert (tmp_path / "index" / "index" / part).read_bytes() == (tmp_path / "in-one-go" / "index" / part).read_bytes()
    assert not list(tmp_path.glob(".index.store*"))
