"""Every picture under docs/ is made by docs/make_pictures.py and recorded in docs/pictures.json with the hash of
its generator and of the picture: a generator changed without re-making its picture, a picture replaced by hand
or a picture nobody records fails here."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def make_pictures():
    spec = importlib.util.spec_from_file_location("make_pictures", DOCS / "make_pictures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_pictures"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def manifest() -> dict:
    return json.loads((DOCS / "pictures.json").read_text())


def test_every_docs_picture_has_a_generator_and_a_manifest_entry():
    pictures = sorted(path.name for path in DOCS.glob("*.png"))
    assert pictures and sorted(make_pictures().PICTURES) == pictures, "add the picture to PICTURES in make_pictures.py"
    assert sorted(manifest()) == pictures, "re-make the pictures: python docs/make_pictures.py"


@pytest.mark.parametrize("name", sorted(make_pictures().PICTURES))
def test_each_picture_was_made_by_its_current_generator(name):
    module, entry = make_pictures(), manifest().get(name)
    assert entry is not None, f"docs/{name} is not in docs/pictures.json: python docs/make_pictures.py --only {name}"
    assert entry["generator"] == module.generator_hash(name), (
        f"the generator of docs/{name} changed since the picture was made: "
        f"python docs/make_pictures.py --only {name}")
    assert entry["picture"] == module.file_hash(DOCS / name), (
        f"docs/{name} is not the picture its generator made (replaced by hand?): "
        f"python docs/make_pictures.py --only {name}")


def test_a_changed_generator_is_caught(monkeypatch):
    module = make_pictures()
    before = module.generator_hash("tensorboard_images.png")
    shot = module.PICTURES["tensorboard_images.png"].screenshot
    monkeypatch.setitem(module.PICTURES, "tensorboard_images.png", module.Picture(
        "tensorboard", module.PICTURES["tensorboard_images.png"].command,
        screenshot=module.Screenshot(shot.query, shot.fragment, height=shot.height + 1)))
    assert module.generator_hash("tensorboard_images.png") != before
    assert module.generator_hash("timeline_gradtoken.png") == manifest()["timeline_gradtoken.png"]["generator"]
