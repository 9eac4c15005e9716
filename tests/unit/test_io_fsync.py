"""fsync before rename: its effect is not observable without a power cut, so count the os.fsync calls."""

import os

from saq_deploy.utils import io


def _track(monkeypatch):
    seen: list[str] = []
    real = os.fsync

    def spy(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(io.os, "fsync", spy)
    return seen


def test_fsync_tree_flushes_every_file(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    files = [tmp_path / "a.bin", tmp_path / "sub" / "b.json"]
    for f in files:
        f.write_bytes(b"x")
    seen = _track(monkeypatch)
    io.fsync_tree(tmp_path)
    for f in files:
        assert str(f) in seen
    assert str(tmp_path) in seen and str(tmp_path / "sub") in seen


def test_atomic_write_fsyncs_file_and_parent(tmp_path, monkeypatch):
    seen = _track(monkeypatch)
    out = tmp_path / "m.json"
    io.write_json_atomic(out, {"a": 1})
    assert out.read_text().strip().startswith("{")
    assert any(os.path.basename(p).startswith(".m.json.") for p in seen), seen  # temp file before rename
    assert str(tmp_path) in seen  # parent folder after rename


def test_export_removes_stale_temp_folders(tmp_path, capsys):
    from saq_deploy.export.api import remove_stale_export_temps

    (tmp_path / "onnxruntime").mkdir()  # the finished export: kept
    for name in (".onnxruntime-k1ll3d", ".old-x1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"half")
    remove_stale_export_temps(tmp_path, "onnxruntime")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnxruntime"]
    assert "removed stale temp folder" in capsys.readouterr().err


def test_published_temp_folder_gets_the_mode_of_a_plain_mkdir(tmp_path):
    import os
    import tempfile

    from saq_deploy.utils.io import publish_mode

    old = os.umask(0o027)
    try:
        tmp = tempfile.mkdtemp(dir=tmp_path)  # 0700 whatever the umask
        plain = tmp_path / "plain"
        plain.mkdir()
        publish_mode(tmp)
        assert os.stat(tmp).st_mode & 0o777 == os.stat(plain).st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


def test_check_writable_meets_the_error_before_any_write(tmp_path):
    import errno

    import pytest

    from saq_deploy.utils.io import check_writable

    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        check_writable(tmp_path / "afile" / "sub" / "g.png")
    assert e.value.errno == errno.ENOTDIR and e.value.filename == str(tmp_path / "afile")
    check_writable(tmp_path / "new" / "g.png")  # a missing folder under a writable one is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing created
