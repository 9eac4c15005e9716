"""Load behaviour: micro-batching, the bounded queue (429), per-request timeout (504), draining."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from saq_deploy.serve.batcher import Job, MicroBatcher, QueueFull, ShuttingDown
from tests.serve.conftest import client_for, make_served

pytest.importorskip("fastapi", reason="serving tests need the 'serve' extra (pip install -e '.[serve]')")

REQ = {"label": 1, "n": 1, "steps": 3, "seed": 0}


def wait_until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_concurrent_requests_share_engine_runs():
    served, eps = make_served(hold=True)
    with client_for(served) as c, ThreadPoolExecutor(8) as pool:
        batcher = c.app_state.batcher
        first = pool.submit(c.post, "/v1/generate", json=REQ)
        assert eps.entered.wait(20)  # the first request holds the engine
        rest = [pool.submit(c.post, "/v1/generate", json={**REQ, "seed": i, "label": i}) for i in range(1, 4)]
        other = [pool.submit(c.post, "/v1/generate", json={**REQ, "steps": 2, "seed": i}) for i in range(2)]
        wait_until(lambda: batcher.depth() == 5)
        eps.release.set()
        responses = [f.result(30) for f in (first, *rest, *other)]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    # 6 requests, 3 engine runs: the held one, the three steps=3 ones together, the two steps=2 ones
    assert batcher.stats.batches == 3 and batcher.stats.jobs == 6
    assert batcher.stats.largest_batch_jobs == 3
    assert [r.json()["batch_images"] for r in responses] == [1, 3, 3, 3, 2, 2]
    assert eps.calls == 3 + 3 + 2  # UNet calls (DDIM: one per step), not one per request
    assert sorted(set(eps.batch_sizes)) == [2, 4, 6]  # CFG doubles the rows: 1, 2 and 3 images
    assert [r.json()["labels"] for r in responses[1:4]] == [[1], [2], [3]]  # each gets its own


def test_engine_profile_caps_the_batch():
    served, eps = make_served(hold=True)
    served.engine_max_batch = 4  # UNet rows: with CFG, 2 images per engine run
    with client_for(served, max_batch=8) as c, ThreadPoolExecutor(6) as pool:
        first = pool.submit(c.post, "/v1/generate", json=REQ)
        assert eps.entered.wait(20)
        rest = [pool.submit(c.post, "/v1/generate", json={**REQ, "seed": i}) for i in range(1, 4)]
        wait_until(lambda: c.app_state.batcher.depth() == 3)
        eps.release.set()
        assert all(f.result(30).status_code == 200 for f in (first, *rest))
        big = c.post("/v1/generate", json={**REQ, "n": 5})  # one request above the cap: split
        assert big.status_code == 200 and len(big.json()["images"]) == 5
    assert max(eps.batch_sizes) <= 4


def test_queue_full_answers_429_with_retry_after():
    served, eps = make_served(hold=True)
    with client_for(served, queue_size=2) as c, ThreadPoolExecutor(4) as pool:
        running = pool.submit(c.post, "/v1/generate", json=REQ)
        assert eps.entered.wait(20)
        queued = [pool.submit(c.post, "/v1/generate", json={**REQ, "seed": i}) for i in (1, 2)]
        wait_until(lambda: c.app_state.batcher.depth() == 2)
        r = c.post("/v1/generate", json=REQ)
        assert r.status_code == 429 and "2 requests already queued" in r.json()["error"]
        assert int(r.headers["Retry-After"]) >= 1
        assert c.get("/readyz").json()["queue_depth"] == 2
        eps.release.set()
        assert all(f.result(30).status_code == 200 for f in (running, *queued))
        assert c.post("/v1/generate", json=REQ).status_code == 200  # accepted again


def test_timeout_answers_504_and_skips_the_abandoned_job():
    served, eps = make_served(hold=True)
    with client_for(served, timeout_s=0.5) as c, ThreadPoolExecutor(2) as pool:
        held = pool.submit(c.post, "/v1/generate", json=REQ)
        assert eps.entered.wait(20)
        t0 = time.monotonic()
        r = c.post("/v1/generate", json={**REQ, "seed": 9})  # queued behind the held run
        assert r.status_code == 504 and "0.5 s request timeout" in r.json()["error"]
        assert time.monotonic() - t0 < 5
        assert held.result(30).status_code == 504
        eps.release.set()
        wait_until(lambda: c.app_state.batcher.depth() == 0)
        ok = c.post("/v1/generate", json=REQ)
        assert ok.status_code == 200
    assert c.app_state.batcher.stats.skipped_cancelled == 1  # the timed-out queued job never ran


def _job(key="k", n=1, capacity=8, payload=0):
    return Job(key=key, n=n, capacity=capacity, payload=payload)


def test_batcher_drains_on_close_and_refuses_after():
    seen = []

    def run(payloads, batch_size):
        time.sleep(0.05)
        seen.append(list(payloads))
        return [p * 10 for p in payloads]

    b = MicroBatcher(run, queue_size=10, wait_s=0)
    with pytest.raises(ShuttingDown):
        b.submit(_job())  # not started yet
    b.start()
    futures = [b.submit(_job(payload=i, key=i % 2)) for i in range(6)]
    assert b.close(drain=True, timeout=10)
    assert [f.result(0) for f in futures] == [0, 10, 20, 30, 40, 50]  # every queued job finished
    assert sum(len(s) for s in seen) == 6
    with pytest.raises(ShuttingDown):
        b.submit(_job())


def test_batcher_errors_reach_every_request_and_worker_survives():
    calls = []

    def run(payloads, batch_size):
        calls.append(payloads)
        if payloads[0] == "boom":
            raise RuntimeError("engine failure")
        return payloads

    b = MicroBatcher(run, queue_size=4, wait_s=0)
    b.start()
    bad: Future = b.submit(_job(payload="boom"))
    with pytest.raises(RuntimeError, match="engine failure"):
        bad.result(10)
    assert b.submit(_job(payload="fine")).result(10) == "fine"
    assert b.stats.failures == 1
    b.close()


def test_batcher_queue_bound_and_cancel_without_drain():
    import threading

    gate = threading.Event()

    def run(payloads, batch_size):
        gate.wait(10)
        return payloads

    b = MicroBatcher(run, queue_size=2, wait_s=0)
    b.start()
    first = b.submit(_job(payload=1, capacity=1))
    wait_until(lambda: b.depth() == 0)  # taken by the worker
    queued = [b.submit(_job(payload=i, capacity=1)) for i in (2, 3)]
    with pytest.raises(QueueFull) as e:
        b.submit(_job(payload=4))
    assert e.value.retry_after_s >= 1
    closer = threading.Thread(target=b.close, kwargs={"drain": False, "timeout": 10})
    closer.start()
    wait_until(lambda: all(f.cancelled() for f in queued))
    gate.set()
    closer.join(10)
    assert first.result(5) == 1
