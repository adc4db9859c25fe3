"""deployments.yaml is a valid Serve config, `serve build` round-trips, and `serve run` serves.

Named test_00_* so it runs before the session's shared Ray cluster exists: `serve run` starts its own.
"""

from __future__ import annotations

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


@pytest.mark.slow
def test_serve_run_deployments_yaml(tmp_path, tiny_model_path):
    cfg = yaml.safe_load((ROOT / "deployments.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["engine"]["cache_dir"] = CACHE_DIR
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
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run tears the app and Ray down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
