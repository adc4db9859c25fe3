"""deployments.yaml is a valid Serve config, `serve build` round-trips, and `serve run` serves.

Named test_00_* so it runs before the session's shared Ray cluster exists: `serve run` starts its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from conftest import CACHE_DIR, free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE = str(Path(sys.executable).with_name("serve"))


@pytest.mark.parametrize("name", ["deployments.yaml", "deployments.gpu.yaml"])
def test_deployments_yaml_is_a_valid_serve_config(name):
    cfg = yaml.safe_load((ROOT / name).read_text())
    schema = ServeDeploySchema.model_validate(cfg)
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    names = {d["name"] for d in cfg["applications"][0]["deployments"]}
    assert names == {"Ingress", "Preprocess", "VLM", "TableExtractor"}
    from serve_app.config import AppConfig

    AppConfig.model_validate(app.args)  # the args are ours and valid (unknown keys would fail)


def test_serve_build_round_trips(tmp_path):
    out = tmp_path / "built.yaml"
    subprocess.run([SERVE, "build", "serve_app.app:app", "-o", str(out)], check=True, cwd=ROOT,
                   capture_output=True, timeout=120)
    built = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(built)
    deps = {d["name"] for d in built["applications"][0]["deployments"]}
    assert deps == {"Ingress", "Preprocess", "VLM", "TableExtractor"}
    assert built["applications"][0]["import_path"] == "serve_app.app:app"


async def _burst(url: str, n: int) -> list:
    """n requests at once, each forced to 200 tokens so that they overlap; half of them streamed."""
    async with httpx.AsyncClient(timeout=120) as c:
        return await asyncio.gather(*[c.post(f"{url}/v1/chat/completions", json={
            "model": "tiny-qwen3-vl", "max_tokens": 200, "min_tokens": 200, "stream": i % 2 == 0,
            "messages": [{"role": "user", "content": f"burst {i}"}]}) for i in range(n)])


@pytest.mark.slow
def test_serve_run_deployments_yaml(tmp_path, tiny_model_path):
    """`serve run` of deployments.yaml serves; with the VLM's admission shrunk (2 running, 1
    queued, the yaml's backpressure_config kept), a burst gets 429 + Retry-After in OpenAI's
    error shape and the service keeps serving. The engine runs in its own process here
    (``engine.separate_process``; the session's app covers the in-process engine): when that
    process is killed, requests get a 503 and Serve replaces the replica, which serves again."""
    cfg = yaml.safe_load((ROOT / "deployments.yaml").read_text())
    vlm = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "VLM")
    assert vlm["backpressure_config"]["status_code"] == 429
    vlm.update(max_ongoing_requests=2, max_queued_requests=1)
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["engine"]["cache_dir"] = CACHE_DIR
    cfg["applications"][0]["args"]["engine"]["separate_process"] = True
    path = tmp_path / "deployments.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([SERVE, "run", str(path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("serve run did not become ready in 240 s")
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-qwen3-vl", "max_tokens": 4,
            "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        burst = asyncio.run(_burst(url, 8))
        codes = sorted(r.status_code for r in burst)
        assert set(codes) == {200, 429} and codes.count(429) >= 3, codes
        for r in burst:
            if r.status_code == 429:
                assert r.headers["retry-after"] == str(vlm["backpressure_config"]["retry_after_s"])
                err = r.json()["error"]
                assert (err["code"], err["type"]) == ("overloaded", "rate_limit_error"), err
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny-qwen3-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "again"}]})
        assert r.status_code == 200, r.text
        _kill_engine_process_and_recover(url)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run tears the app and Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _kill_engine_process_and_recover(url: str) -> None:
    """The VLM's engine process dies: a clear 503 (or, if Serve was quicker, already an answer from
    the replacement), then a new replica with a new engine process serves."""
    def engine_pid():
        try:
            return httpx.get(f"{url}/v1/stats", timeout=10).json()["vlm"].get("engine_pid")
        except (httpx.HTTPError, KeyError, ValueError):
            return None
    pid = engine_pid()
    assert isinstance(pid, int) and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-qwen3-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "dead?"}]})
    if r.status_code != 200:
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed", r.text
    deadline = time.time() + 120
    while time.time() < deadline and engine_pid() in (None, pid):
        time.sleep(1)
    assert engine_pid() not in (None, pid)
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny-qwen3-vl", "max_tokens": 4, "messages": [{"role": "user", "content": "back"}]})
    assert r.status_code == 200, r.text
