"""build-engine says on stderr when it has to export first (minutes), and only then."""

from __future__ import annotations

import pytest

from saq_deploy.calibrate.run import calibrate
from saq_deploy.cli.app import main
from tests.integration.test_calibrate import tiny

pytestmark = pytest.mark.slow


def test_build_engine_announces_the_export(tmp_path, capsys):
    art = tmp_path / "w8a8"
    calibrate(tiny(method="minmax", bits="w8a8"), art)
    assert not (art / "onnx").exists()
    with pytest.raises(SystemExit) as e:
        main(["build-engine", str(art)])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert f"the ONNX export for onnxruntime-cpu in {art} does not exist; exporting it now" in err
    assert (art / "onnx" / "onnxruntime-cpu" / "manifest.json").is_file()
    with pytest.raises(SystemExit) as e:  # the export is cached now: nothing to announce
        main(["build-engine", str(art)])
    assert e.value.code == 0 and "exporting it now" not in capsys.readouterr().err
