"""Expanding batch inputs: directories, globs and manifests, with errors that name the file and line."""

from __future__ import annotations

import json
import shutil

import pytest

from reefcap.clients.inputs import InputError, expand_inputs


@pytest.fixture
def tree(tmp_path, euvp_images):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, src in enumerate(euvp_images[:3]):
        shutil.copy(src, tmp_path / "a" / f"{i}.jpg")
    shutil.copy(euvp_images[3], tmp_path / "a" / "b" / "deep.JPG")
    (tmp_path / "a" / "notes.md").write_text("not listed")
    return tmp_path


def test_directory_is_searched_recursively_in_sorted_order(tree):
    names = [i.image for i in expand_inputs([str(tree / "a")])]
    assert names == [str(tree / "a" / n) for n in ("0.jpg", "1.jpg", "2.jpg", "b/deep.JPG")]


def test_glob_and_duplicates(tree):
    names = [i.image for i in expand_inputs([str(tree / "a" / "*.jpg"), str(tree / "a" / "0.jpg")])]
    assert names == [str(tree / "a" / f"{i}.jpg") for i in range(3)]
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tree / "nothing-*.png")])


def test_directory_without_images_is_an_input_error(tree):
    (tree / "empty" / "sub").mkdir(parents=True)
    (tree / "empty" / "sub" / "notes.md").write_text("no pictures")
    with pytest.raises(InputError, match="empty: no images in this directory"):
        expand_inputs([str(tree / "a"), str(tree / "empty")])


def test_missing_file_is_kept_to_be_reported(tree):
    assert [i.image for i in expand_inputs([str(tree / "gone.jpg")])] == [str(tree / "gone.jpg")]


def test_text_that_lists_no_image_is_an_input_not_a_manifest(tree):
    (tree / "notes.txt").write_text("dive log: turtles at 12 m\n")
    assert [i.image for i in expand_inputs([str(tree / "notes.txt")])] == [str(tree / "notes.txt")]


def test_manifests(tree):
    (tree / "list.txt").write_text("# survey 7\na/0.jpg\n\na/1.jpg\n")
    (tree / "list.jsonl").write_text(json.dumps({"image": "a/2.jpg", "image_id": 7}) + "\n")
    (tree / "list.csv").write_text("path,site\na/b/deep.JPG,north\n")
    coco = {"images": [{"id": 42, "file_name": "a/0.jpg"}], "annotations": []}
    (tree / "coco.json").write_text(json.dumps(coco))
    items = expand_inputs([str(tree / f) for f in ("list.txt", "list.jsonl", "list.csv", "coco.json")])
    assert [i.image for i in items] == [str(tree / p) for p in ("a/0.jpg", "a/1.jpg", "a/2.jpg", "a/b/deep.JPG")]
    assert items[2].image_id == 7
    assert expand_inputs([str(tree / "coco.json")])[0].image_id == 42


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"image": "a/0.jpg"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
        ("bad2.jsonl", '{"caption": "no path"}\n', r"bad2.jsonl:1: no image path"),
        ("bad.csv", "caption\nhello\n", r"bad.csv:1: no image path column"),
        ("bad.json", '{"annotations": []}', r"bad.json: not a COCO-style manifest"),
        ("empty.jsonl", '{"image": ""}\n', r"empty.jsonl:1: expected an image path"),
    ],
)
def test_malformed_manifests_name_file_and_line(tree, name, content, message):
    (tree / name).write_text(content)
    with pytest.raises(InputError, match=message):
        expand_inputs([str(tree / name)])
