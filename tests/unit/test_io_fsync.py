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
