"""Archives are refused as a whole, before anything is written, when any member is unsafe."""

from __future__ import annotations

import os
import tarfile
import zipfile

import pytest
from module_builders import hub_archive, malicious_tar, member

from imvec.errors import ImvecError
from imvec.weights.archives import UnsafeArchiveError, check_members, extract, is_archive

UNSAFE = {
    "absolute path": member("/tmp/imvec-evil"),
    "dot-dot": member("variables/../../imvec-evil"),
    "symlink out (absolute)": member("link", tarfile.SYMTYPE, "/etc/passwd"),
    "symlink out (relative)": member("variables/link", tarfile.SYMTYPE, "../../outside"),
    "hard link out": member("hard", tarfile.LNKTYPE, "../outside"),
    "character device": member("dev", tarfile.CHRTYPE),
    "block device": member("blk", tarfile.BLKTYPE),
    "fifo": member("pipe", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_unsafe_member_refuses_the_whole_archive(tmp_path, case):
    archive = malicious_tar(tmp_path / "a.tar.gz", UNSAFE[case])
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UnsafeArchiveError, match="Nothing was extracted"):
        extract(archive, work / "out")
    assert os.listdir(work) == []  # no output, no temporary directory left
    assert sorted(os.listdir(tmp_path)) == before
    assert not os.path.lexists("/tmp/imvec-evil")


def test_member_under_a_link_is_refused(tmp_path):
    archive = malicious_tar(tmp_path / "a.tar.gz", member("d", tarfile.SYMTYPE, "."),
                            member("d/x"))
    with pytest.raises(UnsafeArchiveError, match="under a link"):
        check_members(archive)


def test_oversized_and_too_many_members(tmp_path):
    archive = malicious_tar(tmp_path / "a.tar.gz", member("big"), payload=b"y" * 5000)
    with pytest.raises(UnsafeArchiveError, match="member limit"):
        extract(archive, tmp_path / "out", max_member_bytes=4096)
    with pytest.raises(UnsafeArchiveError, match="in all"):
        check_members(archive, max_total_bytes=1000)
    with pytest.raises(UnsafeArchiveError, match="more than 1 members"):
        check_members(archive, max_members=1)
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed(tmp_path):
    archive = malicious_tar(tmp_path / "a.tar.gz", *UNSAFE.values())
    with pytest.raises(UnsafeArchiveError, match=f"{len(UNSAFE)} unsafe member"):
        check_members(archive)


def test_hub_module_archive_extracts(tmp_path):
    archive = tmp_path / "module.tar.gz"
    archive.write_bytes(hub_archive(tmp_path))
    assert is_archive(archive)
    out = extract(archive, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "assets", "saved_model.pb", "tfhub_module.pb", "variables"]
    with pytest.raises(FileExistsError):
        extract(archive, out)


def test_links_inside_the_archive_are_fine(tmp_path):
    archive = malicious_tar(tmp_path / "a.tar.gz",
                            member("alias.index", tarfile.SYMTYPE, "model.ckpt.index"))
    out = extract(archive, tmp_path / "out")
    assert (out / "alias.index").read_bytes() == b"abc"


def test_not_an_archive(tmp_path):
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(b"<html>403 Forbidden</html>")
    assert not is_archive(bogus)
    with pytest.raises(ImvecError, match="not a readable tar or zip archive") as info:
        extract(bogus, tmp_path / "out")
    assert "\n" not in str(info.value)  # one line
    assert not (tmp_path / "out").exists()


def chained_links(path):
    """Each link looks safe alone (its target, normalised, stays inside), but ``up`` is
    listed before the link it goes through, so that link does not exist yet when ``up`` is
    checked on disk: once all are unpacked, ``leak`` reads a file beside the archive's root."""
    return malicious_tar(path,
                         member("up", tarfile.SYMTYPE, "d/l1/.."),
                         member("d/l1", tarfile.SYMTYPE, ".."),
                         member("leak", tarfile.SYMTYPE, "up/secret.txt"))


@pytest.mark.parametrize("outside_exists", [True, False])
def test_symlink_chains_cannot_escape_and_the_error_reveals_nothing(tmp_path, outside_exists):
    work = tmp_path / "work"
    work.mkdir()
    if outside_exists:
        (work / "secret.txt").write_text("local secret")
    archive = chained_links(tmp_path / "chain.tar.gz")
    with pytest.raises(UnsafeArchiveError, match="Nothing was extracted") as info:
        extract(archive, work / "out")
    assert not (work / "out").exists()
    message = str(info.value)
    assert "secret" not in message.replace("up/secret.txt", "")  # only the archive's own text
    expected = ("refused {a}: 2 unsafe member(s): 'leak': symlink to 'up/secret.txt' leaves "
                "the archive through other links, 'up': symlink to 'd/l1/..' leaves the "
                "archive through other links.")
    assert message.startswith(expected.format(a=archive))


def test_hard_link_through_a_symlink_is_refused(tmp_path):
    archive = malicious_tar(tmp_path / "h.tar.gz", member("d", tarfile.SYMTYPE, "."),
                            member("h", tarfile.LNKTYPE, "d/model.ckpt.index"))
    with pytest.raises(UnsafeArchiveError, match="hard link"):
        check_members(archive)


def test_link_loops_are_refused(tmp_path):
    archive = malicious_tar(tmp_path / "l.tar.gz", member("a", tarfile.SYMTYPE, "b"),
                            member("b", tarfile.SYMTYPE, "a"))
    with pytest.raises(UnsafeArchiveError, match="loop"):
        check_members(archive)


def zip_of(path, entries: dict) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, b"etc/passwd")
            else:
                zf.writestr(name, data)
    return path.read_bytes()


def test_zip_bundles_extract_like_tars(tmp_path):
    archive = tmp_path / "bundle.zip"
    zip_of(archive, {"variables/variables.index": b"abc", "saved_model.pb": b"pb"})
    assert is_archive(archive)
    out = extract(archive, tmp_path / "out")
    assert (out / "variables" / "variables.index").read_bytes() == b"abc"


def test_unsafe_zips_are_refused_whole(tmp_path):
    link = zipfile.ZipInfo("link")
    link.external_attr = (0o120777 << 16)
    archive = tmp_path / "evil.zip"
    zip_of(archive, {"ok": b"1", "../evil": b"2", "link": link})
    with pytest.raises(UnsafeArchiveError, match="2 unsafe member.*Nothing was extracted"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()
