"""A killed build-engine / export leaves its temp folder beside the output (issue 15 item 7): the next
run removes those of dead processes, says so, and keeps a live concurrent run's folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from saq_deploy.backends import build_engine
from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from saq_deploy.utils.io import owned_temp_prefix, remove_stale_temps
from tests.integration.test_calibrate import tiny


@pytest.fixture()
def live_pid():
    """A process that is alive for the test's duration (a concurrent run's owner)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the PID names no process (a zombie would still count as alive)
    return proc.pid


def test_only_dead_owners_and_legacy_names_are_removed(tmp_path, live_pid):
    names = {
        f".engine-pid{dead_pid()}-abc_12xy": False,  # killed build
        f".engine-old-pid{dead_pid()}-q1w2e3r4": False,  # killed while swapping the old engine out
        ".engine-k1ll3d00": False,  # older saq-deploy (no PID in the name): cannot be live
        f".engine-pid{live_pid}-zz9zz9zz": True,  # a concurrent build in progress
        f".engine-fp16-pid{dead_pid()}-abcdefgh": True,  # another output's temp: not ours to judge
        ".engine.bak": True, "engine": True,  # not temp names at all
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"half")
    heard = []
    removed = remove_stale_temps(tmp_path, (".engine-", ".engine-old-"), "an interrupted build-engine",
                                 heard.append)
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
    assert len(heard) == 3 and all(h.startswith("removed stale temp folder ") and
                                   h.endswith("from an interrupted build-engine") for h in heard), heard


def test_owned_prefix_names_this_process():
    assert owned_temp_prefix(".x-") == f".x-pid{os.getpid()}-"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    out = tmp_path_factory.mktemp("left") / "w8a8"
    calibrate(tiny(method="minmax", bits="w8a8"), out)
    build_engine(out, "onnxruntime")  # exports once; the tests below rebuild from that export
    return out


@pytest.mark.slow
def test_build_engine_killed_mid_build_is_cleaned_by_the_next(art, tmp_path, capsys, live_pid):
    out = tmp_path / "engine"
    ready = tmp_path / "ready"
    # the real build runs in a child; its optimizer step is stretched so the kill lands mid-build
    code = textwrap.dedent(f"""
        import time
        from saq_deploy.backends.registry import OnnxRuntimeBackend as B
        real = B.build
        def stalled(self, src, tmp, *a, **k):
            res = real(self, src, tmp, *a, **k)
            open({str(ready)!r}, "w").close()
            time.sleep(600)
            return res
        B.build = stalled
        from saq_deploy.cli.app import main
        main(["build-engine", {str(art)!r}, "-b", "onnxruntime", "-o", {str(out)!r}])
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ready.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child build never reached its optimizer step"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stderr.close()
    leftover = tmp_path / f".engine-pid{child.pid}-"
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(leftover.name)]
    assert len(stale) == 1 and (stale[0] / "model.onnx").exists()  # what the issue reported
    live = tmp_path / f".engine-pid{live_pid}-concurr1"
    live.mkdir()

    with pytest.raises(SystemExit) as exc:
        main(["build-engine", str(art), "-o", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    assert f"removed stale temp folder {stale[0]} from an interrupted build-engine" in err
    assert (out / "manifest.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "engine", "ready"])
