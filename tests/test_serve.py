"""`wanpack serve`: the job API over one session (FastAPI's TestClient, a real Session on the tiny demo pack, CPU)."""

from __future__ import annotations

import base64
import inspect
import time
from pathlib import Path

import pytest

TestClient = pytest.importorskip("fastapi.testclient").TestClient  # the `serve` extra; the GPU box lacks it

from wanpack.runtime.serve import JobServer, create_app  # noqa: E402
from wanpack.runtime.session import Session  # noqa: E402

SMALL = {"frames": 5, "height": 32, "width": 32, "steps": 2}


@pytest.fixture(scope="module")
def pack(demo_pack_dir) -> Path:
    return demo_pack_dir


@pytest.fixture
def served(pack, tmp_path):
    server = JobServer(pack, tmp_path / "out", overrides=SMALL, log=lambda m: None)
    with TestClient(create_app(server)) as client:
        yield server, client
    server.close()


def wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}").json()
        if state["state"] in ("done", "failed"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {state}")


def test_job_lifecycle_and_the_engine_kept_between_jobs(served):
    server, client = served
    r = client.post("/v1/jobs", json={"prompt": "a fox", "seed": 4})
    assert r.status_code == 201 and r.json()["state"] == "queued"
    job = r.json()["id"]
    done = wait(client, job)
    assert done["state"] == "done" and done["seed"] == 4 and done["error"] is None
    assert done["progress"]["frames"] == 5 and Path(done["video"]).name == f"{job}.mp4"
    video = client.get(f"/v1/jobs/{job}/video")
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and len(video.content) > 100
    engine = server.session._dit
    second = wait(client, client.post("/v1/jobs", json={"prompt": "a cat"}).json()["id"])
    assert second["state"] == "done" and server.session._dit is engine  # planned and loaded once
    health = client.get("/v1/health").json()
    assert health["ok"] and health["jobs_done"] == 2 and health["device"] == "cpu"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": ""}, 400, '"prompt" must be a non-empty string'),
        ({"prompt": "x", "stepz": 3}, 400, "did you mean 'steps'"),
        ({"prompt": "x", "frames": 6}, 400, "4n+1"),
        ({"prompt": "x", "image_base64": "%%%"}, 400, "not valid base64"),
        ({"prompt": "x", "image_base64": base64.b64encode(b"\x89PNG not really").decode()}, 400, "--image"),
        (["a list"], 400, "JSON object"),
    ],
    ids=["empty-prompt", "unknown-key", "frames", "bad-base64", "image-for-t2v", "not-an-object"],
)  # fmt: skip
def test_bad_jobs_get_4xx_json_and_are_not_queued(served, body, status, fragment):
    server, client = served
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == status and fragment in r.json()["error"], r.json()
    assert server.queued() == 0 and server.jobs == {}
    assert not list(server.out_dir.glob("*.input.*"))  # an uploaded image of a refused job is not kept


def test_not_json_unknown_job_and_video_before_done(served):
    _, client = served
    r = client.post("/v1/jobs", content=b"nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    assert client.get("/v1/jobs/nope").status_code == 404
    assert client.get("/v1/jobs/nope/video").status_code == 404


def test_a_failed_job_does_not_stop_the_server(served, monkeypatch):
    server, client = served
    real = Session.generate

    def flaky(self, job, progress):
        if job.prompt == "explode":
            raise RuntimeError("the GPU caught fire")
        return real(self, job, progress)

    monkeypatch.setattr(Session, "generate", flaky)
    bad = client.post("/v1/jobs", json={"prompt": "explode"}).json()["id"]
    good = client.post("/v1/jobs", json={"prompt": "a fox"}).json()["id"]
    failed = wait(client, bad)
    assert failed["state"] == "failed" and "internal error: RuntimeError: the GPU caught fire" in failed["error"]
    assert client.get(f"/v1/jobs/{bad}/video").status_code == 409
    assert wait(client, good)["state"] == "done"


def test_serve_binds_localhost_by_default():
    from wanpack.commands.serve import serve

    params = inspect.signature(serve.__wrapped__).parameters
    assert params["host"].default.default == "127.0.0.1"
