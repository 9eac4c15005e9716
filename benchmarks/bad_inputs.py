"""Render the bad-input catalogue (tests/cli/test_bad_input_catalogue.py) into docs/results/bad-inputs.md.

    python benchmarks/bad_inputs.py [--out docs/results/bad-inputs.md] [--only ID,ID]

Runs every row exactly as the test does (same setup, same command, same checks) and writes one
table line per row: the input, the exit code, and the error line the user sees, with machine paths
replaced by placeholders so the file only changes when a message does. Exits 1 if a row whose
expectation is not marked as a known defect fails its checks.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cli import bad_input_setups as S
from tests.cli.test_bad_input_catalogue import CASES, check, error_line, prepare, run, snapshot

PLACEHOLDERS = """Placeholders: `<tmp>` is the row's own empty folder; `<tmp>/art` a copy of a real calibrated
artifact (minmax W8A8 of `builtin:digits`) with its cached ONNX export and ONNX Runtime engine
(`<tmp>/art/engine`); `<tmp>/other` a copy re-calibrated (another state hash); `<tmp>/model` a copy
of the `builtin:digits` diffusers folder. The setup column says how the row spoils its copy."""


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _cmd(case) -> str:
    words = ["saq-deploy", *(a.replace("{", "<").replace("}", ">") if "{" in a else a for a in case.args)]
    words = [w.replace("<art>", "<tmp>/art").replace("<engine>", "<tmp>/art/engine")
             .replace("<other>", "<tmp>/other").replace("<model>", "<tmp>/model") for w in words]
    return " ".join(words)


def _stable(line: str, tmp: Path, base_root: Path) -> str:
    for path, name in ((tmp, "<tmp>"), (base_root, "<base>"), (ROOT, "<repo>")):
        line = line.replace(str(path.resolve()), name).replace(str(path), name)
    # hidden temp names carry random letters (mkstemp): keep the file stable
    return re.sub(r"(/\.[^/\s']+?)\.[A-Za-z0-9_]{8}\.tmp", r"\1.<random>.tmp", line)


def run_rows(cases, work: Path) -> list[dict]:
    base = S.build_base(work / "base") if any(set(c.needs) & {"art", "other"} for c in cases) else None
    rows = []
    for i, case in enumerate(cases):
        tmp = work / f"row{i:03d}"
        tmp.mkdir()
        if case.via == "readonly" and not S.can_bind_mount_readonly(tmp):
            rows.append({"case": case, "code": None, "line": "(skipped: no read-only bind mount here)",
                         "status": "skipped"})
            continue
        prepare(case, tmp, base)
        before = snapshot(tmp)
        code, stderr = run(case, tmp)
        try:
            check(case, tmp, code, stderr, before)
            status = "ok" if not case.defect else "defect fixed: remove its mark"
        except AssertionError as e:
            why = _stable(str(e).splitlines()[0] if str(e) else "assertion failed", tmp, work)[:200]
            status = f"DEFECT: {case.defect}" if case.defect else f"FAILS: {why}"
        line = error_line(stderr) or "(no stderr)"
        rows.append({"case": case, "code": code, "line": _stable(line, tmp, work), "status": status})
        print(f"{status[:6]:6} {case.id}: {code} {rows[-1]['line'][:110]}", file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict]) -> str:
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_defect = sum(r["status"].startswith("DEFECT") for r in rows)
    out = ["# Bad-input catalogue", "",
           ("Every bad input the CLI is known to meet, what it answers, and the exit code (2: usage error, 1: "
           "anything else). Each row is a test in `tests/cli/test_bad_input_catalogue.py` that asserts the exit "
           "code, the key words of the single `error:` line, no traceback, no \"unexpected\" error, and that no "
           "output, hidden temp file or changed file was left. Rendered by `python benchmarks/bad_inputs.py`."), "",
           PLACEHOLDERS, "",
           (f"{len(rows)} rows: {n_ok} behave as expected, {n_defect} known defect(s) (marked xfail in the test), "
           f"{len(rows) - n_ok - n_defect} other."), "",
           "| # | case | input (setup) | exit (expected) | message | status |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        c = r["case"]
        setup = f" ({_md(c.what)})" if c.what else ""
        via = {"fsize": "; run in a subprocess under the limit", "readonly": "; run in a private mount namespace",
               "subprocess": "; run in a subprocess"}.get(c.via, "")
        out.append(f"| {i} | {c.id} | `{_md(_cmd(c))}`{setup}{via} | {r['code']} ({c.code}) | "
                   f"`{_md(r['line'])}` | {_md(r['status'])} |")
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "bad-inputs.md")
    p.add_argument("--only", default="", help="comma-separated case ids (default: all); prints, writes nothing")
    a = p.parse_args()
    only = {s for s in a.only.split(",") if s}
    cases = [c for c in CASES if not only or c.id in only]
    if only - {c.id for c in cases}:
        print(f"error: unknown case id(s): {', '.join(sorted(only - {c.id for c in cases}))}", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    with tempfile.TemporaryDirectory(prefix="bad-inputs-") as work:
        rows = run_rows(cases, Path(work))
    text = render(rows)
    if only:
        print(text)
    else:
        from saq_deploy.utils.io import write_bytes_atomic

        write_bytes_atomic(a.out, text)
        print(f"wrote {a.out} ({len(rows)} rows)")
    return 0 if all(r["status"] in ("ok", "skipped") or r["status"].startswith("DEFECT") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
