"""Help text must show recipe table names: rich treats unescaped `[model]` as markup and drops it."""

from __future__ import annotations

from typer.testing import CliRunner

from saq_deploy.cli.app import app


def test_calibrate_help_shows_recipe_table_names():
    result = CliRunner().invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    for table in ("[model].spec", "[quant].bits", "[calibration].seed", "[reconstruction].iters"):
        assert table in result.output, table
