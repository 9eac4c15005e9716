"""Smoke-check a running server: wait for /readyz, generate one image, check it is a PNG.

    python -m saq_deploy.serve.probe http://127.0.0.1:8000 [--api-key-file F] [--wait 120]

Standard library only (the slim image and CI call it); exit 0 when the image came back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _request(url: str, *, data: bytes | None = None, headers: dict | None = None,
             timeout: float = 30.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_ready(base: str, wait_s: float) -> dict:
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, _, body = _request(f"{base}/readyz", timeout=5)
            if status == 200:
                return json.loads(body)
            last = json.loads(body).get("reason", f"HTTP {status}")
        except (OSError, ValueError) as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{base} was not ready within {wait_s:g} s ({last})")


def generate_png(base: str, api_key: str | None, body: dict) -> tuple[bytes, dict]:
    headers = {"Content-Type": "application/json", "Accept": "image/png"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    status, hdrs, data = _request(f"{base}/v1/generate", data=json.dumps(body).encode(), headers=headers, timeout=120)
    if status != 200:
        raise RuntimeError(f"POST /v1/generate answered {status}: {data[:300]!r}")
    if not data.startswith(PNG_MAGIC):
        raise RuntimeError("POST /v1/generate did not return a PNG")
    return data, hdrs


def _cond_for(base: str, api_key: str | None) -> dict:
    """Cross-attention models need an embedding: send zeros of the advertised shape, no guidance."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    status, _, data = _request(f"{base}/v1/model", headers=headers, timeout=10)
    info = json.loads(data) if status == 200 else {}
    if info.get("model", {}).get("kind") != "text":
        return {}
    cond = info.get("cond") or {}
    return {"embedding": [[0.0] * int(cond.get("dim") or 1)] * int(cond.get("tokens") or 1), "cfg": 1.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m saq_deploy.serve.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key-file", type=Path, default=None)
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for /readyz")
    p.add_argument("--label", type=int, default=None)
    args = p.parse_args(argv)
    base = args.url.rstrip("/")
    key = args.api_key_file.read_text().strip() if args.api_key_file else None
    try:
        wait_ready(base, args.wait)
        body = {"n": 1, "seed": 0, **({"label": args.label} if args.label is not None else {})}
        body.update(_cond_for(base, key))
        png, hdrs = generate_png(base, key, body)
    except (OSError, RuntimeError, TimeoutError, ValueError) as e:
        print(f"probe: FAILED: {e}", file=sys.stderr)
        return 1
    warn = {k.lower(): v for k, v in hdrs.items()}.get("x-saq-warning")
    print(f"probe: ok ({len(png)}-byte PNG from {base}{'; warning: ' + warn if warn else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
