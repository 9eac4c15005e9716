"""Hostile and malformed requests get a 4xx with one clear message, and the server keeps
serving correct images afterwards."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import client_for

pytest.importorskip("fastapi", reason="serving tests need the 'serve' extra (pip install -e '.[serve]')")

KEY = "k" * 20 + "-secret-token"
GOOD = {"label": 3, "n": 2, "seed": 1, "steps": 3}


def assert_images_ok(client, headers=None, n=2):
    r = client.post("/v1/generate", json={**GOOD, "n": n}, headers=headers or {})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == n and body["labels"] == [3] * n
    for b64 in body["images"]:
        img = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert img.format == "PNG" and img.size == (8, 8) and img.mode == "L"
        assert np.asarray(img).std() > 0  # a sample, not a constant image


BAD = [
    ('{"label": 3, "n": ', 400, "malformed JSON"),
    ('not json at all', 400, "malformed JSON"),
    ('[1, 2, 3]', 422, "valid dictionary"),
    ('{"n": "2"}', 422, "n: Input should be a valid integer"),
    ('{"n": true}', 422, "n: Input should be a valid integer"),
    ('{"n": 2.5}', 422, "n: Input should be a valid integer"),
    ('{"steps": "ten"}', 422, "steps: Input should be a valid integer"),
    ('{"cfg": "high"}', 422, "cfg: Input should be a valid number"),
    ('{"label": [1]}', 422, "label: Input should be a valid integer"),
    ('{"n": 0}', 422, "n: Input should be greater than or equal to 1"),
    ('{"n": 17}', 422, "above this server's limit of 16"),
    ('{"n": 100000}', 422, "n: Input should be less than or equal to 64"),
    ('{"steps": 0}', 422, "steps: Input should be greater than or equal to 1"),
    ('{"steps": 101}', 422, "above this server's limit of 100"),
    ('{"steps": -5}', 422, "steps: Input should be greater than or equal to 1"),
    ('{"cfg": -1}', 422, "cfg: Input should be greater than or equal to 0"),
    ('{"cfg": 25}', 422, "cfg=25.0 is above this server's limit of 20.0"),
    ('{"cfg": 1e999}', 422, "cfg: Input should be"),
    ('{"cfg": NaN}', 422, "cfg: Input should be a finite number"),
    ('{"label": 10}', 422, "label 10 is outside 0..9"),
    ('{"label": -1}', 422, "label: Input should be greater than or equal to 0"),
    ('{"sampler": "euler"}', 422, "sampler: Input should be 'ddim', 'plms'"),
    ('{"spacing": "karras"}', 422, "spacing: Input should be"),
    ('{"seed": -3}', 422, "seed: Input should be greater than or equal to 0"),
    ('{"model": "builtin:digits"}', 422, "model: Extra inputs are not permitted"),
    ('{"engine": "/etc/passwd"}', 422, "engine: Extra inputs are not permitted"),
    ('{"embedding": [[0.1, 0.2]]}', 422, "class-conditional: send 'label'"),
]


@pytest.mark.parametrize("body, status, fragment", BAD)
def test_bad_requests_then_still_serving(tiny_served, body, status, fragment):
    served, _ = tiny_served
    with client_for(served) as c:
        r = c.post("/v1/generate", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        msg = r.json()["error"]
        assert fragment in msg, msg
        assert "\n" not in msg and "Traceback" not in r.text
        assert_images_ok(c)


def test_all_bad_requests_in_a_row_then_images(tiny_served):
    served, eps = tiny_served
    with client_for(served) as c:
        for body, status, _ in BAD:
            assert c.post("/v1/generate", content=body,
                          headers={"Content-Type": "application/json"}).status_code == status
        assert eps.calls == 0  # nothing bad reached the engine
        assert_images_ok(c)


def test_oversized_body_content_length_and_chunked(tiny_served):
    served, _ = tiny_served
    with client_for(served, max_body_bytes=4096) as c:
        r = c.post("/v1/generate", content=b'{"pad": "' + b"x" * 10_000 + b'"}',
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "4096-byte limit" in r.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            for _ in range(100):
                yield b" " * 1000

        r = c.post("/v1/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "4096-byte limit" in r.json()["error"]
        r = c.post("/v1/generate", content=b"{}", headers={"Content-Type": "application/json",
                                                           "Content-Length": "abc"})
        assert r.status_code == 400
        assert_images_ok(c)


@pytest.mark.parametrize("headers, fragment", [
    ({}, "missing API key"),
    ({"Authorization": "Bearer wrong-token-of-some-length"}, "invalid API key"),
    ({"Authorization": f"Basic {KEY}"}, "invalid API key"),
    ({"Authorization": f"Bearer {KEY}x"}, "invalid API key"),
    ({"Authorization": "Bearer"}, "invalid API key"),
])
def test_api_key_required(tiny_served, headers, fragment):
    served, eps = tiny_served
    with client_for(served, api_key=KEY) as c:
        for path, method in (("/v1/generate", "post"), ("/v1/model", "get")):
            r = getattr(c, method)(path, headers=headers, **({"json": GOOD} if method == "post" else {}))
            assert r.status_code == 401 and fragment in r.json()["error"]
            assert r.headers["WWW-Authenticate"] == "Bearer"
        # malformed JSON from an unauthenticated client: still 401 (auth is checked first)
        r = c.post("/v1/generate", content="{", headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 401
        assert eps.calls == 0
        # probes stay open for load balancers
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert_images_ok(c, headers={"Authorization": f"Bearer {KEY}"})


def test_png_response_and_accept(tiny_served):
    served, _ = tiny_served
    with client_for(served) as c:
        r = c.post("/v1/generate", json={"label": 7, "n": 1, "seed": 5, "steps": 3},
                   headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["X-SAQ-Label"] == "7" and r.headers["X-SAQ-Seed"] == "5"
        img = Image.open(io.BytesIO(r.content))
        assert img.size == (8, 8) and img.mode == "L"
        again = c.post("/v1/generate", json={"label": 7, "n": 1, "seed": 5, "steps": 3},
                       headers={"Accept": "image/png"})
        assert again.content == r.content  # same seed, same image
        r = c.post("/v1/generate", json={"n": 2, "steps": 3}, headers={"Accept": "image/png"})
        assert r.status_code == 406 and "n=1" in r.json()["error"]
        r = c.post("/v1/generate", json={"n": 2, "steps": 3}, headers={"Accept": "image/png, application/json"})
        assert r.status_code == 200 and len(r.json()["images"]) == 2


def test_text_model_embedding_checks():
    from tests.serve.conftest import make_served

    served, _ = make_served("text")
    emb = [[0.1] * 12] * 3
    with client_for(served) as c:
        for body, fragment in [
            ({"label": 1, "embedding": emb}, "'label' does not apply"),
            ({"n": 1}, "send 'embedding'"),
            ({"embedding": [[0.1] * 5]}, "width 5; this model needs 12"),
            ({"embedding": [[0.1] * 12, [0.1] * 11]}, "rectangular"),
            ({"embedding": []}, "rectangular"),
            ({"embedding": "/tmp/emb.safetensors"}, "embedding: Input should be a valid list"),
            ({"embedding": emb, "cfg": 2.0}, "needs 'negative_embedding'"),
            ({"embedding": emb, "cfg": 2.0, "negative_embedding": [[0.0] * 12] * 2}, "has shape (2, 12)"),
        ]:
            r = c.post("/v1/generate", json=body)
            assert r.status_code == 422 and fragment in r.json()["error"], (body, r.text)
        inf_row = "[" + ", ".join(["1e999"] * 12) + "]"
        r = c.post("/v1/generate", content='{"embedding": [' + inf_row + "]}",
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "non-finite" in r.json()["error"], r.text
        r = c.post("/v1/generate", json={"embedding": emb, "negative_embedding": [[0.0] * 12] * 3, "cfg": 2.0,
                                         "n": 2, "steps": 2, "seed": 0})
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        assert img.size == (8, 8) and img.mode == "RGBA"  # 4 latent channels
        assert c.get("/v1/model").json()["cond"] == {"tokens": None, "dim": 12}


@pytest.mark.parametrize("method, path, body, headers, status, fragment", [
    ("get", "/nope", None, {}, 404, "no such endpoint: /nope"),
    ("get", "/v1/generate", None, {}, 405, "method GET is not allowed on /v1/generate"),
    ("delete", "/healthz", None, {}, 405, "method DELETE is not allowed on /healthz"),
    ("post", "/v1/generate", '{"label": 3', {"Content-Type": "application/json"}, 400, "malformed JSON body"),
    ("post", "/v1/generate", '{"label": 3}', {"Content-Type": "text/plain"}, 415,
     "send 'Content-Type: application/json' (got 'text/plain')"),
    # what `curl -d` sends without -H 'Content-Type: application/json'
    ("post", "/v1/generate", '{"label": 3}', {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "must be JSON"),
    ("post", "/v1/generate", '{"label": 3}', {}, 415, "(got none)"),
])
def test_routing_and_parse_errors_use_the_error_body(tiny_served, method, path, body, headers, status, fragment):
    served, eps = tiny_served
    with client_for(served) as c:
        kw = {"content": body, "headers": headers} if body is not None else {}
        r = c.request(method.upper(), path, **kw)
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        doc = r.json()
        assert fragment in doc["error"] and set(doc) <= {"error", "detail"}, doc
        if status == 405:
            assert r.headers["Allow"] in ("POST", "GET")  # still says what is allowed
        assert eps.calls == 0
        # a JSON content type with parameters or a +json suffix is JSON
        for ctype in ("application/json; charset=utf-8", "application/vnd.api+json"):
            ok = c.post("/v1/generate", content=b'{"label": 3, "steps": 3, "n": 1}', headers={"Content-Type": ctype})
            assert ok.status_code == 200, (ctype, ok.text)
