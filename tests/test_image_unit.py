"""Unit tests of pure logic: apt source parsing, mirror choice, recipe hashing."""

from pathlib import Path

import pytest

from harness import image
from harness.errors import ImageError

DEB822 = """\
Types: deb
# http://snapshot.example/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no
"""


def test_deb822_parsing_skips_src_and_disabled():
    srcs = image.parse_deb822_sources(DEB822)
    assert [s.uri for s in srcs] == ["http://mirror.example/debian", "http://mirror.example/debian-security"]
    assert srcs[0].suites == ("bookworm", "bookworm-updates")


def test_one_line_sources_with_options():
    text = "# comment\ndeb [arch=amd64 signed-by=/x.gpg] http://m.example/debian/ bookworm main contrib\n" \
           "deb-src http://m.example/debian bookworm main\n"
    srcs = image.parse_one_line_sources(text)
    assert len(srcs) == 1
    assert srcs[0].uri == "http://m.example/debian"
    assert srcs[0].components == ("main", "contrib")


def test_pick_mirror_takes_the_suite_not_security():
    srcs = image.parse_deb822_sources(DEB822)
    assert image.pick_mirror(srcs, "bookworm") == "http://mirror.example/debian"
    assert image.pick_mirror(srcs, "bookworm-security") == "http://mirror.example/debian-security"
    with pytest.raises(ImageError, match="SATORI_MIRROR"):
        image.pick_mirror(srcs, "trixie")


def test_host_sources_read_from_a_folder(tmp_path: Path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    (tmp_path / "sources.list").write_text("deb http://old.example/debian bullseye main\n")
    uris = [s.uri for s in image.host_apt_sources(tmp_path)]
    assert uris[0] == "http://old.example/debian"
    assert "http://mirror.example/debian" in uris


def test_recipe_hash_is_stable_and_sensitive(tmp_path: Path, monkeypatch):
    r = tmp_path / "r.yaml"
    r.write_text("suite: bookworm\n")
    monkeypatch.setattr(image, "recipe_inputs", lambda p: [p])
    h1 = image.recipe_hash(r, "6.1.0-1-amd64")
    assert h1 == image.recipe_hash(r, "6.1.0-1-amd64")
    assert h1 != image.recipe_hash(r, "6.1.0-2-amd64")
    r.write_text("suite: bookworm\npackages: [fio]\n")
    assert h1 != image.recipe_hash(r, "6.1.0-1-amd64")


def test_recipe_inputs_cover_guest_files():
    names = {p.name for p in image.recipe_inputs(image.DEFAULT_RECIPE)}
    assert {"bookworm.yaml", "initramfs-init", "rc.sysinit", "image.py"} <= names


def test_recipe_validation(tmp_path: Path):
    r = tmp_path / "bad.yaml"
    r.write_text("suite: bookworm\n")
    with pytest.raises(ImageError, match="missing field 'packages'"):
        image.load_recipe(r)
    r.write_text("suite: [\n")
    with pytest.raises(ImageError, match="not valid YAML"):
        image.load_recipe(r)


def test_another_release_comes_from_the_hosts_archive():
    srcs = image.parse_deb822_sources(DEB822)
    # no source serves trixie: the archive that serves the host's release serves it too
    assert image.archive_mirror(srcs, "trixie") == "http://mirror.example/debian"
    assert image.archive_mirror(srcs, "bookworm-security") == "http://mirror.example/debian-security"
    assert image.security_mirror(srcs) == "http://mirror.example/debian-security"
    with pytest.raises(ImageError, match="SATORI_MIRROR"):
        image.archive_mirror(image.parse_deb822_sources(DEB822.split("\n\n")[1]), "trixie")


def test_private_apt_sources_name_the_suite_and_its_security_updates():
    text = image.private_apt_sources("trixie", "http://m.example/debian", "http://m.example/debian-security")
    lines = text.splitlines()
    assert lines[0].endswith("http://m.example/debian trixie main")
    assert lines[1].endswith("http://m.example/debian-security trixie-security main")
    assert all("signed-by=/usr/share/keyrings/debian-archive-keyring.gpg" in x for x in lines)
    assert len(image.private_apt_sources("trixie", "http://m.example/debian", None).splitlines()) == 1


def test_second_image_recipe_is_stock_and_shares_the_dataset():
    trixie = image.load_recipe(image.IMAGES_DIR / "trixie.yaml")
    bookworm = image.load_recipe(image.DEFAULT_RECIPE)
    assert trixie["suite"] != bookworm["suite"] and trixie["guest_patch"] is False
    assert trixie["datasets"] == bookworm["datasets"]  # byte-identical data in both images
    names = {p.name for p in image.recipe_inputs(image.IMAGES_DIR / "trixie.yaml")}
    assert "trixie.yaml" in names and "rc.sysinit" in names
    assert not any(n.endswith(".patch") for n in names)  # the guest patch is not an input
