"""Every loader format on small real files, malformed rows naming file and line, splits, COCO round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from reefcap.models.data.datasets import load_dataset
from reefcap.models.data.records import CaptionRecord, DatasetError, split_records, write_coco
from reefcap.models.errors import ReefcapError


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(("a.jpg", "b.jpg", "c.jpg")):
        Image.new("RGB", (8 + i, 6), (40 * i, 90, 200)).save(folder / name)
    return folder


def by_name(records):
    return {r.path.name: r.captions for r in records}


def test_coco_with_metadata(tmp_path, images):
    doc = {
        "images": [
            {"id": 1, "file_name": "imgs/a.jpg", "scene_id": 7, "domain": "underwater", "metadata": {"range_m": 3}},
            {"id": 2, "file_name": "imgs/b.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "a fish"},
            {"id": 2, "image_id": 2, "caption": "a turtle"},
            {"id": 3, "image_id": 1, "caption": "one fish"},
        ],
    }
    (tmp_path / "c.json").write_text(json.dumps(doc))
    recs = load_dataset(tmp_path / "c.json")
    assert by_name(recs) == {"a.jpg": ("a fish", "one fish"), "b.jpg": ("a turtle",)}
    assert recs[0].image_id == 1 and recs[0].path == (images / "a.jpg").resolve() and recs[0].path.is_absolute()
    assert recs[0].metadata == {"scene_id": 7, "domain": "underwater", "range_m": 3}


def test_coco_annotation_for_unknown_image_and_bad_json(tmp_path, images):
    doc = {"images": [{"id": 1, "file_name": "imgs/a.jpg"}], "annotations": [{"image_id": 9, "caption": "x"}]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"c\.json \[annotations\[0\]\].*image_id 9"):
        load_dataset(tmp_path / "c.json")
    (tmp_path / "broken.json").write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DatasetError, match=r"broken\.json:2: invalid JSON"):
        load_dataset(tmp_path / "broken.json", fmt="coco")


def test_karpathy_keeps_its_split(tmp_path, images):
    doc = {
        "dataset": "coco",
        "images": [
            {"filepath": "imgs", "filename": "a.jpg", "cocoid": 11, "split": "restval", "sentences": [{"raw": "A."}]},
            {
                "filepath": "imgs",
                "filename": "b.jpg",
                "cocoid": 12,
                "split": "test",
                "sentences": [{"tokens": ["x", "y"]}],
            },
        ],
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(doc))
    recs = load_dataset(tmp_path / "dataset_coco.json")
    assert [(r.image_id, r.captions, r.metadata["split"]) for r in recs] == [
        (11, ("A.",), "train"),
        (12, ("x y",), "test"),
    ]
    assert split_records(recs)["test"] == [recs[1]]
    doc["images"][0]["sentences"] = [{"nothing": 1}]
    (tmp_path / "dataset_coco.json").write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"images\[0\].*sentences\[0\]"):
        load_dataset(tmp_path / "dataset_coco.json")


def test_flickr_token_file_and_malformed_line(tmp_path, images):
    lines = ["a.jpg#0\tA fish swims .", "a.jpg#1\tAnother fish .", "c.jpg#0\tA ray ."]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    recs = load_dataset(tmp_path / "Flickr8k.token.txt", images_root=images)
    assert by_name(recs) == {"a.jpg": ("A fish swims .", "Another fish ."), "c.jpg": ("A ray .",)}
    (tmp_path / "bad.token").write_text("a.jpg#0\tok\nno tab on this line\n")
    with pytest.raises(DatasetError, match=r"bad\.token:2:"):
        load_dataset(tmp_path / "bad.token", images_root=images)


def test_jsonl_manifest_caption_and_captions_and_metadata(tmp_path, images):
    rows = [
        {"image": "imgs/a.jpg", "caption": "first", "water": "green"},
        {"image": "imgs/a.jpg", "caption": "second"},
        {"image": "imgs/b.jpg", "captions": ["x", "y"], "split": "validation"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_dataset(tmp_path / "m.jsonl")
    assert by_name(recs) == {"a.jpg": ("first", "second"), "b.jpg": ("x", "y")}
    assert recs[0].metadata == {"water": "green"} and recs[1].metadata == {"split": "val"}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"image": "imgs/a.jpg"', "invalid JSON"),
        ('{"caption": "no image"}', "no image path"),
        ('{"image": "imgs/a.jpg"}', "no caption"),
        ('{"image": "imgs/a.jpg", "caption": ""}', "non-empty string"),
        ('{"image": "imgs/a.jpg", "captions": []}', "non-empty list"),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_jsonl_malformed_rows_name_file_and_line(tmp_path, images, line, message):
    (tmp_path / "m.jsonl").write_text('{"image": "imgs/a.jpg", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(DatasetError, match=rf"m\.jsonl:2: .*{message}"):
        load_dataset(tmp_path / "m.jsonl")


def test_csv_manifest_with_multiple_caption_forms(tmp_path, images):
    text = 'image,caption,depth\nimgs/a.jpg,"a fish, swimming",3\nimgs/b.jpg,a turtle,\n'
    (tmp_path / "m.csv").write_text("\ufeff" + text)  # with the BOM spreadsheets write
    recs = load_dataset(tmp_path / "m.csv")
    assert by_name(recs) == {"a.jpg": ("a fish, swimming",), "b.jpg": ("a turtle",)}
    assert recs[0].metadata == {"depth": "3"} and recs[1].metadata == {}
    (tmp_path / "many.csv").write_text('file_name,captions\nimgs/a.jpg,"[""one"", ""two""]"\nimgs/b.jpg,x|y|z\n')
    assert by_name(load_dataset(tmp_path / "many.csv")) == {"a.jpg": ("one", "two"), "b.jpg": ("x", "y", "z")}


def test_csv_malformed_rows(tmp_path, images):
    (tmp_path / "short.csv").write_text("image,caption\nimgs/a.jpg,ok\nimgs/b.jpg\n")
    with pytest.raises(DatasetError, match=r"short\.csv:3: expected 2 columns"):
        load_dataset(tmp_path / "short.csv")
    (tmp_path / "nocap.csv").write_text("image,label\nimgs/a.jpg,ok\n")
    with pytest.raises(DatasetError, match=r"nocap\.csv:2: no caption"):
        load_dataset(tmp_path / "nocap.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetError, match="empty CSV"):
        load_dataset(tmp_path / "empty.csv")


def test_imagefolder_directory_and_split_folders(tmp_path, images):
    (images / "metadata.jsonl").write_text(
        '{"file_name": "a.jpg", "text": "a fish"}\n{"file_name": "c.jpg", "text": "a ray"}\n'
    )
    assert by_name(load_dataset(images)) == {"a.jpg": ("a fish",), "c.jpg": ("a ray",)}
    root = tmp_path / "hf"
    for split, name in (("train", "a.jpg"), ("validation", "b.jpg")):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / split / name)
        (root / split / "metadata.jsonl").write_text(json.dumps({"file_name": name, "caption": split}) + "\n")
    recs = load_dataset(root)
    assert [(r.path.name, r.metadata["split"]) for r in recs] == [("a.jpg", "train"), ("b.jpg", "val")]
    (images / "metadata.jsonl").write_text('{"image": "a.jpg", "text": "no file_name"}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:1: .*file_name"):
        load_dataset(images)


def test_missing_images_are_named(tmp_path, images):
    (tmp_path / "m.jsonl").write_text(
        '{"image": "imgs/a.jpg", "caption": "x"}\n{"image": "imgs/gone.jpg", "caption": "y"}\n'
    )
    with pytest.raises(DatasetError, match=r"1 image\(s\) not found: .*gone\.jpg"):
        load_dataset(tmp_path / "m.jsonl")
    assert len(load_dataset(tmp_path / "m.jsonl", check_images=False)) == 2


def test_errors_are_reefcap_errors_and_unknown_formats_refused(tmp_path):
    (tmp_path / "x.yaml").write_text("a: 1")
    with pytest.raises(ReefcapError, match="cannot tell the dataset format"):
        load_dataset(tmp_path / "x.yaml")
    with pytest.raises(DatasetError, match="unknown dataset format"):
        load_dataset(tmp_path / "x.yaml", fmt="parquet")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nope.json")


def fake_records(n, scenes=None):
    return [CaptionRecord(i, Path(f"/x/{i}.jpg"), ("c",), {"scene_id": (scenes or {}).get(i, i)}) for i in range(n)]


def test_split_is_deterministic_order_independent_and_70_15_15():
    recs = fake_records(200)
    a = split_records(recs, seed=3)
    assert {k: len(v) for k, v in a.items()} == {"train": 140, "val": 30, "test": 30}
    b = split_records(list(reversed(recs)), seed=3)
    assert {k: sorted(r.image_id for r in v) for k, v in a.items()} == {
        k: sorted(r.image_id for r in v) for k, v in b.items()
    }
    c = split_records(recs, seed=4)
    assert {r.image_id for r in a["test"]} != {r.image_id for r in c["test"]}


def test_split_keeps_a_scene_together():
    recs = fake_records(100, scenes={i: i // 2 for i in range(100)})  # pairs share a scene
    parts = split_records(recs)
    # 50 scenes cut 35/7/8 (the cuts round on scenes, not images): every split holds some, each image is in one.
    assert {k: len(v) for k, v in parts.items()} == {"train": 70, "val": 14, "test": 16}
    assert sorted(r.image_id for part in parts.values() for r in part) == list(range(100))
    for part in parts.values():
        ids = {r.image_id for r in part}
        assert all((i ^ 1) in ids for i in ids)


def test_write_coco_round_trips(tmp_path, images):
    recs = [
        CaptionRecord("a", images / "a.jpg", ("one", "two"), {"scene_id": 4, "domain": "surface", "water": "I"}),
        CaptionRecord("b", images / "b.jpg", ("three",), {}),
    ]
    out = tmp_path / "out" / "train.json"
    write_coco(recs, out)
    doc = json.loads(out.read_text())
    assert doc["images"][0] == {
        "id": 1,
        "file_name": "../imgs/a.jpg",
        "width": 8,
        "height": 6,
        "scene_id": 4,
        "domain": "surface",
        "metadata": {"water": "I", "source_id": "a"},
    }
    assert [a["id"] for a in doc["annotations"]] == [1, 2, 3]
    back = load_dataset(out)
    assert [(r.path, r.captions) for r in back] == [(r.path.resolve(), r.captions) for r in recs]
    assert back[0].metadata["scene_id"] == 4 and back[0].metadata["water"] == "I"


def test_kaggle_flickr_variants_csv_captions_txt_and_pipe_results(tmp_path, images):
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,A fish .\na.jpg,Two fish .\nb.jpg,A ray .\n")
    recs = load_dataset(tmp_path / "captions.txt", images_root=images)
    assert by_name(recs) == {"a.jpg": ("A fish .", "Two fish ."), "b.jpg": ("A ray .",)}
    text = "image_name| comment_number| comment\na.jpg| 0| A turtle .\nc.jpg| 0| A coral .\n"
    (tmp_path / "results.csv").write_text(text)
    assert by_name(load_dataset(tmp_path / "results.csv", images_root=images)) == {
        "a.jpg": ("A turtle .",),
        "c.jpg": ("A coral .",),
    }
