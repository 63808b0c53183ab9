import pytest

from monarch_sync.exceptions import PathEscape, SyncProtocolError
from monarch_sync.manifest import (
    DIGEST_SIZE,
    Entry,
    Kind,
    Manifest,
    validate_link,
    validate_path,
)

D1, D2 = b"\x01" * DIGEST_SIZE, b"\x02" * DIGEST_SIZE


def sample(exe: bool = False) -> Manifest:
    return Manifest(
        [
            Entry("b.txt", Kind.FILE, exe, 3, ((D1, 3),)),
            Entry("a", Kind.DIR),
            Entry("a/big", Kind.FILE, 0o644, 7, ((D2, 4), (D1, 3))),
            Entry("a/link", Kind.LINK, target="../b.txt"),
        ]
    )


def test_roundtrip_and_root_hash_is_stable() -> None:
    m = sample()
    again = Manifest.decode(m.encode())
    assert again.entries == m.entries
    assert again.root_hash == m.root_hash
    assert [e.path for e in m.entries] == ["a", "a/big", "a/link", "b.txt"]


def test_digests_of_the_wrong_size_are_refused_not_truncated() -> None:
    bad = Manifest([Entry("f", Kind.FILE, 0o644, 1, ((b"\x01" * 32, 1),))])
    with pytest.raises(ValueError, match="16 bytes"):
        bad.encode()


def test_root_hash_covers_exec_bit() -> None:
    assert sample(False).root_hash != sample(True).root_hash


def test_blob_table_is_unique_chunks_in_order() -> None:
    m = sample()
    assert m.blobs == [(D2, 4), (D1, 3)]
    assert m.blob_index == {D2: 0, D1: 1}


@pytest.mark.parametrize("path", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/."])
def test_bad_paths_are_refused(path: str) -> None:
    with pytest.raises(PathEscape):
        validate_path(path)


@pytest.mark.parametrize("target", ["/etc", "../..", "../../x", ""])
def test_links_leaving_the_tree_are_refused(target: str) -> None:
    with pytest.raises(PathEscape):
        validate_link("a/l", target)


def test_links_inside_the_tree_are_kept() -> None:
    validate_link("a/l", "../b")
    validate_link("a/l", "c/../d")


def test_decode_refuses_writing_through_a_symlink() -> None:
    m = Manifest([Entry("l", Kind.LINK, target="."), Entry("l/x", Kind.FILE, 0o644, 0, ())])
    with pytest.raises(PathEscape):
        Manifest.decode(m.encode())


def test_decode_refuses_escaping_path() -> None:
    m = Manifest([Entry("../evil", Kind.FILE, 0o644, 0, ())])
    with pytest.raises(PathEscape):
        Manifest.decode(m.encode())


def test_decode_refuses_garbage() -> None:
    with pytest.raises(SyncProtocolError):
        Manifest.decode(b"MSM1\x00\x00\x00\x05xx")


def test_patch_rebuilds_the_same_manifest() -> None:
    old = sample()
    new = Manifest(
        [
            Entry("b.txt", Kind.FILE, 0o755, 3, ((D1, 3),)),
            Entry("c", Kind.DIR),
            Entry("c/x", Kind.FILE, 0o644, 4, ((D2, 4),)),
        ]
    )
    changed, removed = new.patch_from(old)
    assert sorted(removed) == ["a", "a/big", "a/link"]
    again = Manifest.from_patch(old, changed, removed)
    assert again.root_hash == new.root_hash


def test_patch_cannot_orphan_entries_or_escape() -> None:
    old = sample()
    with pytest.raises(PathEscape):  # folder "a" removed but "a/big" kept
        Manifest.from_patch(old, Manifest([]).encode(), ["a"])
    evil = Manifest([Entry("../x", Kind.FILE, 0o644, 0, ())]).encode()
    with pytest.raises(PathEscape):
        Manifest.from_patch(old, evil, [])
