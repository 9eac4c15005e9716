"""Bad-input catalogue (issue 15): one row per bad input a user or an attacker can give the CLI, each
asserting the exit code, the key words of the single ``error:`` line, and that nothing was written
or changed. benchmarks/bad_inputs.py renders the same rows into docs/results/bad-inputs.md."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli import bad_input_setups as S

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # {tmp}: the row's own folder; {art} {engine} {other} {model}: copies made there
    code: int
    words: tuple[str, ...]  # must all appear in the error line
    what: str = ""  # the bad input in words (for the rendered catalogue)
    setup: object = None  # callable(tmp: Path) run after the copies, to make the bad input
    needs: tuple[str, ...] = ()  # "art" (artifact + export + engine), "other", "model"
    via: str = "inproc"  # "inproc", "subprocess", "fsize" (RLIMIT_FSIZE), "readonly" (ro bind mount)
    defect: str | None = None  # a known product defect: the row is xfail(strict) until it is fixed
    outputs: tuple[str, ...] | None = None  # paths that must not exist after (default: the -o value)


A = ("-n", "1", "--steps", "1")  # the cheapest sample run, for rows that must get as far as writing
G = ("-o", "{tmp}/g.png")
CASES: list[Case] = [
    # --- option values and names: usage errors, exit 2 -------------------------------------------
    Case("unknown-command", ("frobnicate",), 2, ("No such command",)),
    Case("unknown-option", ("sample", "--colour", "red", *G), 2, ("No such option", "--colour")),
    Case("sample-unknown-sampler", ("sample", "--sampler", "euler", *G), 2, ("'euler' is not one of",)),
    Case("sample-unknown-spacing", ("sample", "--spacing", "karras", *G), 2, ("karras",)),
    Case("sample-steps-0", ("sample", "--steps", "0", *G), 2, ("--steps must be >= 1",)),
    Case("sample-steps-not-int", ("sample", "--steps", "ten", *G), 2, ("'--steps'", "Input should be a valid integer")),
    Case("sample-n-0", ("sample", "-n", "0", *G), 2, ("-n must be >= 1",)),
    Case("sample-cfg-negative", ("sample", "--cfg", "-1", *A, *G), 2, ("--cfg must be >= 0",)),
    Case("sample-batch-size-0", ("sample", "--batch-size", "0", *A, *G), 2, ("--batch-size must be >= 1",)),
    Case("sample-label-12", ("sample", "--label", "12", *A, *G), 2, ("outside 0..9",)),
    Case("sample-label-negative", ("sample", "--label", "-1", *A, *G), 2, ("outside 0..9",)),
    Case("calibrate-unknown-method", ("calibrate", "--method", "gptq", "-o", "{tmp}/o"), 2, ("gptq",)),
    Case("calibrate-unknown-bits", ("calibrate", "--bits", "w3a8", "-o", "{tmp}/o"), 2, ("w3a8",)),
    Case("export-calib-samples-0", ("export", "{tmp}/art", "--calib-samples", "0"), 2,
         ("--calib-samples must be >= 1",)),
    Case("export-unknown-target", ("export", "{tmp}/art", "-t", "tpu"), 2, ("tpu",)),
    Case("build-engine-max-batch-0", ("build-engine", "{tmp}/art", "--max-batch", "0", "-o", "{tmp}/e"), 2,
         ("--max-batch",)),
    Case("build-engine-unknown-backend", ("build-engine", "{tmp}/art", "-b", "tpu"), 2, ("tpu",)),
    Case("validate-steps-0", ("validate", "{tmp}/art", "--steps", "0"), 2, ("--steps",)),
    Case("validate-n-0", ("validate", "{tmp}/art", "-n", "0"), 2, ("--num-samples",)),
    Case("bench-calls-0", ("bench", "{tmp}/art", "--calls", "0"), 2, ("--calls",)),
    Case("bench-batch-0", ("bench", "{tmp}/art", "--batch", "0"), 2, ("--batch",)),
    Case("lint-unknown-target", ("lint", "-t", "tensorrt-llm", "{tmp}/m.onnx"), 2, ("tensorrt-llm",),
         setup=S.junk_onnx),
    Case("serve-port-0", ("serve", "{tmp}", "--port", "0"), 2, ("--port",)),
    Case("serve-missing-artifact", ("serve", "{tmp}/nope"), 2, ("does not exist",)),
    Case("export-triton-missing-artifact", ("export-triton", "{tmp}/nope", "-o", "{tmp}/repo"), 2,
         ("does not exist",)),
    # --- models given to sample / calibrate ---------------------------------------------------
    Case("sample-unknown-builtin", ("sample", "--model", "builtin:cifar", *G), 1,
         ("unknown built-in model 'builtin:cifar'",)),
    Case("sample-model-missing", ("sample", "--model", "{tmp}/nope", *G), 1, ("does not exist",)),
    Case("sample-model-is-a-file", ("sample", "--model", "{tmp}/w.safetensors", *G), 1, ("is a file",),
         "a weights file instead of its folder", S.a_file("w.safetensors")),
    Case("sample-model-no-config", ("sample", "--model", "{tmp}/empty", *G), 1,
         ("not a diffusers model folder",), "an empty folder", S.a_folder("empty")),
    Case("sample-model-garbage-weights", ("sample", "--model", "{model}", *A, *G), 1,
         ("not a valid safetensors file",), "weights file overwritten with garbage", S.garbage_weights,
         ("model",)),
    Case("sample-model-truncated-weights", ("sample", "--model", "{model}", *A, *G), 1,
         ("not a valid safetensors file",), "weights file cut to half its size", S.truncated_weights,
         ("model",)),
    Case("sample-model-pickle-as-safetensors", ("sample", "--model", "{model}", *A, *G), 1,
         ("not a valid safetensors file",), "a pickle saved as diffusion_pytorch_model.safetensors",
         S.pickle_weights, ("model",)),
    Case("sample-model-pickle-bin", ("sample", "--model", "{model}", *A, *G), 1,
         ("holds pickled Python objects", "could run code"),
         "only a .bin weights file, a pickle holding a Python object", S.pickle_bin, ("model",)),
    Case("sample-model-missing-keys", ("sample", "--model", "{model}", *A, *G), 1,
         ("missing key(s)", "randomly initialised"), "weights file without conv_out.weight",
         S.drop_key, ("model",)),
    Case("sample-model-unexpected-keys", ("sample", "--model", "{model}", *A, *G), 1,
         ("unexpected key(s)", "extra.weight"), "weights file with an extra tensor", S.extra_key, ("model",)),
    Case("sample-model-no-scheduler", ("sample", "--model", "{model}", *A, *G), 1,
         ("no scheduler_config.json",), "scheduler_config.json deleted", S.rm("model/scheduler_config.json"),
         ("model",)),
    Case("sample-model-wrong-class", ("sample", "--model", "{model}", *A, *G), 1, ("holds a VQModel model",),
         "config.json names a VQModel", S.wrong_class, ("model",)),
    Case("calibrate-model-missing", ("calibrate", "-m", "{tmp}/none", "-o", "{tmp}/o"), 1, ("does not exist",)),
    # --- prompts (text-to-image UNets) ----------------------------------------------------------
    Case("sample-prompt-on-class-model", ("sample", "--prompt", "a bold seven", *A, *G), 1,
         ("--prompt", "class-conditional", "--label"), "--prompt given to the class-conditional builtin:digits"),
    Case("sample-label-on-text-model", ("sample", "-m", "builtin:digits-text", "--label", "3", *A, *G), 1,
         ("--label", "--prompt"), "--label given to the text-to-image builtin:digits-text"),
    Case("sample-prompt-and-cond-file", ("sample", "-m", "builtin:digits-text", "--prompt", "thin 3",
                                         "--cond-file", "{tmp}/c.safetensors", *A, *G), 1, ("not both",),
         "--prompt together with --cond-file embeddings", S.a_file("c.safetensors")),
    Case("sample-prompts-file-missing", ("sample", "-m", "builtin:digits-text", "--prompts-file", "{tmp}/p.txt",
                                         *A, *G), 1, ("--prompts-file", "does not exist")),
    Case("sample-prompts-file-empty", ("sample", "-m", "builtin:digits-text", "--prompts-file", "{tmp}/p.txt",
                                       *A, *G), 1, ("holds no prompts",), "a prompts file of blank lines",
         S.a_text("p.txt", "\n  \n")),
    # --- outputs a user cannot write ------------------------------------------------------------
    Case("sample-output-not-png", ("sample", *A, "-o", "{tmp}/g.jpg"), 1, ("must end in .png",)),
    Case("sample-output-permission-denied", ("sample", *A, "-o", "/sys/saq-grid.png"), 1,
         ("cannot write /sys/saq-grid.png", "permission denied")),
    Case("sample-output-read-only-folder", ("sample", *A, "-o", "{tmp}/ro/g.png"), 1,
         ("cannot write {tmp}/ro/g.png", "read-only file system"), "output folder on a read-only mount",
         S.a_folder("ro"), via="readonly"),
    Case("sample-output-under-a-file", ("sample", *A, "-o", "{tmp}/afile/g.png"), 1,
         ("cannot write {tmp}/afile", "not a folder"), "output path under a regular file", S.a_file("afile")),
    Case("sample-disk-full", ("sample", "-n", "4", "--steps", "1", *G), 1,
         ("while writing {tmp}/g.png", "free space or choose another output folder"),
         "file-size limit (RLIMIT_FSIZE) of 64 bytes: the kernel's EFBIG, as on a full disk", via="fsize"),
    Case("sample-manifest-path-is-a-folder", ("sample", *A, *G), 1, ("cannot write {tmp}/g.json",),
         "g.json (the manifest written beside g.png) is an existing folder", S.a_folder("g.json")),
    Case("sample-output-is-a-folder", ("sample", *A, "-o", "{tmp}/d.png"), 1, ("cannot write {tmp}/d.png",),
         "-o names an existing folder", S.a_folder("d.png"), outputs=()),
    Case("calibrate-output-exists", ("calibrate", "-o", "{tmp}/o"), 1, ("already exists",),
         "the output folder exists (it must stay as it is)", S.a_folder("o"), outputs=()),
    Case("calibrate-output-under-a-file", ("calibrate", "--method", "minmax", "-o", "{tmp}/afile/o"), 1,
         ("cannot write {tmp}/afile", "not a folder"), "output path under a regular file", S.a_file("afile")),
    # --- recipes ----------------------------------------------------------------------------
    Case("recipe-missing", ("calibrate", "-c", "{tmp}/none.toml", "-o", "{tmp}/o"), 1, ("does not exist",)),
    Case("recipe-is-a-folder", ("calibrate", "-c", "{tmp}/recipes", "-o", "{tmp}/o"), 1,
         ("is a folder", "pass a recipe file"), "-c names a folder", S.a_folder("recipes")),
    Case("recipe-not-toml", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1, ("not valid TOML",),
         "recipe `not = [toml`", S.recipe("not = [toml")),
    Case("recipe-unknown-key", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1, ("bogus",),
         "recipe `[calibration] bogus = 1`", S.recipe("[calibration]\nbogus = 1\n")),
    Case("recipe-unknown-table", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1, ("training",),
         "recipe `[training] lr = 1`", S.recipe("[training]\nlr = 1\n")),
    Case("recipe-warmup-str", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1,
         ("reconstruction.warmup must be a number, got 'abc' (str)",), "recipe `warmup = \"abc\"`",
         S.recipe('[reconstruction]\nwarmup = "abc"\n')),
    Case("recipe-seed-str", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1,
         ("calibration.seed must be an integer, got '0' (str)",), "recipe `seed = \"0\"`",
         S.recipe('[calibration]\nseed = "0"\n')),
    Case("recipe-steps-float", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1,
         ("calibration.steps must be an integer, got 2.5 (float)",), "recipe `steps = 2.5`",
         S.recipe("[calibration]\nsteps = 2.5\n")),
    Case("recipe-bool-str", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1,
         ("quant.attention_matmul must be true or false",), "recipe `attention_matmul = \"yes\"`",
         S.recipe('[quant]\nattention_matmul = "yes"\n')),
    Case("recipe-spec-int", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1, ("model.spec must be a string",),
         "recipe `[model] spec = 3`", S.recipe("[model]\nspec = 3\n")),
    Case("recipe-unknown-method", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1,
         ("calibration.method",), "recipe `method = \"gptq\"`", S.recipe('[calibration]\nmethod = "gptq"\n')),
    Case("recipe-block-size", ("calibrate", "-c", "{tmp}/r.toml", "-o", "{tmp}/o"), 1, ("block",),
         "recipe `weight_block_size = 96`", S.recipe("[quant]\nweight_block_size = 96\n")),
    Case("calibrate-steps-0", ("calibrate", "--steps", "0", "-o", "{tmp}/o"), 2, ("calibration.steps",)),
    Case("calibrate-num-samples-0", ("calibrate", "-n", "0", "-o", "{tmp}/o"), 2, ("num_samples",)),
    Case("evaluate-n-0", ("evaluate", "-n", "0", "-o", "{tmp}/e.json"), 2, ("-n must be >= 1",)),
    # --- calibrated artifacts (the hash chain) ----------------------------------------------------
    Case("export-missing-artifact", ("export", "{tmp}/nope"), 1, ("not a calibrated artifact",)),
    Case("export-empty-folder", ("export", "{tmp}"), 1, ("not a calibrated artifact",)),
    Case("export-truncated-state", ("export", "{art}"), 1, ("does not match the hash in its manifest",),
         "calibrated.safetensors cut to half its size", S.truncate("art/calibrated.safetensors"), ("art",)),
    Case("export-state-deleted", ("export", "{art}"), 1, ("has no calibrated.safetensors",),
         "calibrated.safetensors deleted", S.rm("art/calibrated.safetensors"), ("art",)),
    Case("export-pickle-state", ("export", "{art}"), 1, ("not a valid safetensors file",),
         "a pickle saved as calibrated.safetensors, its hash written into manifest.json", S.pickle_state, ("art",)),
    Case("export-edited-bits", ("export", "{art}"), 1, ("bits", "the manifest was edited"),
         "manifest.json `bits` w8a8 -> w4a4", S.edit_manifest("bits", "w4a4"), ("art",)),
    Case("export-edited-method", ("export", "{art}"), 1, ("method", "the manifest was edited"),
         "manifest.json `method` minmax -> sa-ptq", S.edit_manifest("method", "sa-ptq"), ("art",)),
    Case("export-edited-quant-config", ("export", "{art}"), 1, ("quant_config", "the manifest was edited"),
         "manifest.json activation bits 8 -> 4", S.edit_act_bits, ("art",)),
    Case("export-recipe-deleted", ("export", "{art}"), 1, ("recipe.json", "is missing"), "recipe.json deleted",
         S.rm("art/recipe.json"), ("art",)),
    Case("export-recipe-edited", ("export", "{art}"), 1, ("recipe.json", "does not match the hash"),
         "recipe.json method edited", S.edit_recipe, ("art",)),
    Case("export-manifest-not-json", ("export", "{art}"), 1, ("is not valid JSON",),
         "manifest.json overwritten with text", S.write("art/manifest.json", "{not json"), ("art",)),
    Case("sample-artifact-missing", ("sample", "--artifact", "{tmp}/nope", *A, *G), 1, ("not a calibrated artifact",)),
    Case("sample-artifact-truncated-state", ("sample", "--artifact", "{art}", *A, *G), 1,
         ("does not match the hash",), "calibrated.safetensors cut to half its size",
         S.truncate("art/calibrated.safetensors"), ("art",)),
    Case("build-engine-not-artifact", ("build-engine", "{tmp}"), 1, ("not a calibrated artifact",)),
    Case("build-engine-truncated-state", ("build-engine", "{art}"), 1, ("does not match the hash",),
         "calibrated.safetensors cut in half, ONNX export cached", S.truncate("art/calibrated.safetensors"), ("art",)),
    Case("build-engine-non-onnx", ("build-engine", "{art}", "--onnx", "{tmp}/m.onnx", "-o", "{tmp}/e"), 1,
         ("not an ONNX model",), "--onnx names a text file", S.junk_onnx, ("art",)),
    Case("build-engine-onnx-missing", ("build-engine", "{art}", "--onnx", "{tmp}/none.onnx", "-o", "{tmp}/e"), 1,
         ("does not exist",), needs=("art",)),
    Case("build-engine-onnx-other-inputs", ("build-engine", "{art}", "--onnx", "{tmp}/m.onnx", "-o", "{tmp}/e"), 1,
         ("has inputs ['x']",), "--onnx names a valid ONNX with other inputs", S.relu_onnx, ("art",)),
    Case("build-engine-output-under-a-file", ("build-engine", "{art}", "-o", "{tmp}/afile/e"), 1,
         ("cannot write {tmp}/afile", "not a folder"), "output path under a regular file", S.a_file("afile"),
         ("art",)),
    Case("build-engine-output-is-a-file", ("build-engine", "{art}", "-o", "{tmp}/notes.txt"), 1,
         ("{tmp}/notes.txt",), "-o names an existing file of the user's", S.a_file("notes.txt"), ("art",),
         outputs=()),
    Case("build-engine-output-is-a-user-folder", ("build-engine", "{art}", "-o", "{tmp}/docs"), 1, ("{tmp}/docs",),
         "-o names an existing folder of the user's files (not an engine)", S.user_folder("docs"), ("art",),
         outputs=()),
    Case("build-engine-profile-without-tensorrt", ("build-engine", "{art}", "-p", "{tmp}/p.toml", "-o", "{tmp}/e"),
         2, ("--profile", "does not apply to --backend onnxruntime"), "a build profile for the ONNX Runtime backend",
         S.write("p.toml", "[batch]\nmax = 4\n"), ("art",)),
    Case("build-engine-trt-profile-missing", ("build-engine", "{art}", "-b", "tensorrt", "-p", "{tmp}/none.toml"), 1,
         ("none.toml",), needs=("art",)),
    # --- engines --------------------------------------------------------------------------------
    Case("sample-engine-not-engine", ("sample", "--engine", "{tmp}/d", *A, *G), 1, ("not an engine folder",),
         "an empty folder", S.a_folder("d")),
    Case("sample-engine-missing", ("sample", "--engine", "{tmp}/nope", *A, *G), 1, ("{tmp}/nope",)),
    Case("sample-engine-tampered-file", ("sample", "--engine", "{engine}", *A, *G), 1, ("does not match the hash",),
         "one byte appended to engine/model.onnx", S.append_byte("art/engine/model.onnx"), ("art",)),
    Case("sample-engine-file-deleted", ("sample", "--engine", "{engine}", *A, *G), 1, ("is missing",),
         "engine/model.onnx deleted", S.rm("art/engine/model.onnx"), ("art",)),
    Case("sample-engine-tampered-manifest", ("sample", "--engine", "{engine}", *A, *G), 1, ("was edited",),
         "engine manifest parity threshold min_psnr_db 32 -> 0", S.loosen_gate, ("art",)),
    Case("sample-engine-manifest-not-json", ("sample", "--engine", "{engine}", *A, *G), 1, ("is not valid JSON",),
         "engine manifest.json overwritten with text", S.write("art/engine/manifest.json", "{"), ("art",)),
    Case("validate-other-calibration", ("validate", "{other}", "--engine", "{engine}"), 1, ("different calibration",),
         "an engine built from another calibration", needs=("art", "other")),
    Case("validate-engine-not-engine", ("validate", "{art}", "--engine", "{tmp}"), 1, ("not an engine folder",),
         needs=("art",)),
    Case("inspect-not-engine", ("inspect", "{tmp}"), 1, ("not an engine folder",)),
    Case("inspect-tampered-manifest", ("inspect", "{engine}"), 1, ("was edited",),
         "engine manifest parity threshold min_psnr_db 32 -> 0", S.loosen_gate, ("art",)),
    Case("summary-not-validated", ("summary", "{tmp}"), 1, ("no validation result",)),
    # --- lint ----------------------------------------------------------------------------------
    Case("lint-non-onnx", ("lint", "{tmp}/m.onnx"), 1, ("m.onnx",), "a text file named m.onnx", S.junk_onnx),
    Case("lint-missing", ("lint", "{tmp}/none.onnx"), 1, ("does not exist",)),
    Case("lint-folder", ("lint", "{tmp}"), 1, ("{tmp}",)),
    # --- serve / export-triton ------------------------------------------------------------------
    Case("serve-api-key-file-missing", ("serve", "{art}", "--api-key-file", "{tmp}/key"), 1,
         ("--api-key-file", "does not exist"), needs=("art",)),
    Case("serve-api-key-file-empty", ("serve", "{art}", "--api-key-file", "{tmp}/key"), 1, ("is empty",),
         "an empty key file", S.write("key", "\n"), ("art",)),
    Case("serve-api-key-short", ("serve", "{art}", "--api-key-file", "{tmp}/key"), 1, ("shorter than 16",),
         "a 6-character key", S.write("key", "secret\n"), ("art",)),
    Case("serve-log-level", ("serve", "{art}", "--log-level", "loud"), 1, ("--log-level",), needs=("art",)),
    Case("serve-max-batch-0", ("serve", "{tmp}", "--max-batch", "0"), 2, ("--max-batch must be >= 1",)),
    Case("serve-timeout-negative", ("serve", "{tmp}", "--timeout", "-1"), 2, ("--timeout must be > 0",)),
    Case("serve-not-artifact", ("serve", "{tmp}"), 1, ("not a calibrated artifact",), "an empty folder",
         via="subprocess"),
    Case("serve-tampered-engine", ("serve", "{art}"), 1, ("was edited",),
         "engine manifest parity threshold min_psnr_db 32 -> 0", S.loosen_gate, ("art",), via="subprocess"),
    Case("export-triton-bad-name", ("export-triton", "{art}", "--name", "../x", "-o", "{tmp}/repo"), 1,
         ("--name",), needs=("art",)),
    Case("export-triton-output-under-a-file", ("export-triton", "{art}", "-o", "{tmp}/afile/repo"), 1,
         ("cannot write {tmp}/afile", "not a folder"), "output path under a regular file", S.a_file("afile"),
         ("art",)),
    Case("export-triton-exists", ("export-triton", "{art}", "-o", "{tmp}/repo"), 1, ("exists", "--force"),
         "the model folder repo/saq_unet exists (it must stay as it is)", S.a_folder("repo/saq_unet"), ("art",),
         outputs=()),
    Case("export-triton-instances-0", ("export-triton", "{art}", "--instances", "0", "-o", "{tmp}/repo"), 1,
         ("--instances must be >= 1",), needs=("art",)),
    Case("export-triton-other-calibration", ("export-triton", "{other}", "--engine", "{engine}", "-o", "{tmp}/repo"),
         1, ("different calibration",), "an engine built from another calibration", needs=("art", "other")),
]

# ---------------------------------------------------------------------------------------------
HIDDEN_TEMPS = (".*.tmp", ".*.partial", ".engine-*", ".e-*")


def expand(s: str, tmp: Path) -> str:
    return (s.replace("{art}", str(tmp / "art")).replace("{engine}", str(tmp / "art" / "engine"))
            .replace("{other}", str(tmp / "other")).replace("{model}", str(tmp / "model"))
            .replace("{tmp}", str(tmp)))


def prepare(case: Case, tmp: Path, base: S.Base | None) -> None:
    """Copy the shared inputs the row needs into ``tmp``, then make them bad."""
    for need in case.needs:
        src = {"art": base and base.art, "other": base and base.other, "model": S.DIGITS}[need]
        shutil.copytree(src, tmp / need)
    if case.setup is not None:
        case.setup(tmp)


def snapshot(tmp: Path) -> dict[str, tuple]:
    """Every path under ``tmp`` with its size and mtime: a new, changed or removed file shows."""
    out = {}
    for p in sorted(tmp.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(tmp))] = ("d",) if p.is_dir() else (st.st_size, st.st_mtime_ns)
    return out


_CHILD = """
import resource, signal, sys
from saq_deploy.cli.app import main
if sys.argv[1] == "fsize":  # SIGXFSZ ignored: the write fails with EFBIG instead of killing us
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
main(sys.argv[2:])
"""


def run(case: Case, tmp: Path) -> tuple[int, str]:
    """(exit code, stderr) of the row's command, run the way the row says."""
    args = [expand(a, tmp) for a in case.args]
    if case.via == "inproc":
        from saq_deploy.cli.app import main

        err = io.StringIO()
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            try:
                main(args)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        return code, err.getvalue()
    cmd = [sys.executable, "-c", _CHILD, case.via, *args]
    if case.via == "readonly":  # a private mount namespace: the read-only bind mount is ours alone
        ro = shlex.quote(str(tmp / "ro"))
        script = f'mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, "sh", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.returncode, proc.stderr


def error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check(case: Case, tmp: Path, code: int, stderr: str, before: dict) -> None:
    line = error_line(stderr)
    assert code == case.code, (code, stderr)
    assert line.startswith("error: "), stderr
    assert sum(ln.startswith("error:") for ln in stderr.splitlines()) == 1, stderr
    # "error: unexpected <Type>: ..." is main()'s catch-all for exceptions nobody turned into a message
    assert "Traceback" not in stderr and not line.startswith("error: unexpected "), stderr
    for w in case.words:
        assert expand(w, tmp) in line, (w, line)
    # outputs=(): -o names a file or folder of the user's that must survive (the snapshot checks it)
    outs = case.outputs if case.outputs is not None else \
        [case.args[i + 1] for i, a in enumerate(case.args[:-1]) if a in ("-o", "--output")]
    for o in map(Path, (expand(o, tmp) for o in outs)):
        assert not o.exists(), f"{o} was left behind"
        if o.parent.is_dir() and not o.parent.is_relative_to(tmp):
            assert not [p for pat in HIDDEN_TEMPS for p in o.parent.glob(pat)]
    after = snapshot(tmp)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def _params():
    for c in CASES:
        marks = [pytest.mark.slow] if c.needs and c.needs != ("model",) or c.via != "inproc" else []
        if c.defect:
            marks.append(pytest.mark.xfail(strict=True, reason=f"defect: {c.defect}"))
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return S.build_base(tmp_path_factory.mktemp("catalogue"))


def test_catalogue_is_large_and_unique():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", list(_params()))
def test_bad_input(case: Case, tmp_path, request):
    if case.via == "readonly" and not S.can_bind_mount_readonly(tmp_path):
        pytest.skip("needs `unshare -m` and mount (root in a container) for a real read-only mount")
    b = request.getfixturevalue("base") if set(case.needs) & {"art", "other"} else None
    prepare(case, tmp_path, b)
    before = snapshot(tmp_path)
    code, stderr = run(case, tmp_path)
    check(case, tmp_path, code, stderr, before)
