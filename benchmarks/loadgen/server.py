"""Start the whole Serve app in-process from ``deployments.yaml`` (with overrides) on a free port.

This is what ``serve run deployments.yaml`` does (``serve_start`` + ``deploy_apps``), done from the
benchmark's own driver so one process can measure several engine configs in a row and read
``serve.status()`` for the autoscaling run. The Ray cluster is always a new local one
(``address="local"``) with explicit ``num_cpus``, so it never joins another cluster on this host.
"""

from __future__ import annotations

import copy
import math
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "serve_app"
log = logging.getLogger("loadgen")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_serve_config(config_path: str | os.PathLike = ROOT / "deployments.yaml", *, port: int,
                       engine: dict[str, Any] | None = None, args: dict[str, Any] | None = None,
                       deployments: dict[str, dict[str, Any]] | None = None, tables: bool = False,
                       vlm_num_gpus: float | None = None) -> dict[str, Any]:
    """The Serve config (a ``ServeDeploySchema`` dict) for one benchmark target.

    ``engine`` / ``args`` are merged into the app's ``args``; ``deployments`` maps a deployment name
    to options merged into its entry. ``tables=False`` drops the TableExtractor (the benchmark asks
    no table questions, and its OCR stack would take CPU from the replicas under test).
    """
    cfg = yaml.safe_load(Path(config_path).read_text())
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": port}
    cfg["proxy_location"] = "HeadOnly"
    app = cfg["applications"][0]
    app["name"], app["route_prefix"] = APP_NAME, "/"
    app_args = _merge(app.get("args") or {}, args or {})
    app_args["engine"] = _merge(app_args.get("engine") or {}, engine or {})
    app_args.setdefault("tables", {})["enabled"] = tables
    app["args"] = app_args
    deps = [d for d in app.get("deployments", []) if tables or d["name"] != "TableExtractor"]
    by_name = {d["name"]: d for d in deps}
    for name, over in (deployments or {}).items():
        if name not in by_name:
            raise ValueError(f"no deployment {name!r} in {config_path}")
        by_name[name].update(_merge(by_name[name], over))
    if vlm_num_gpus:
        by_name["VLM"].setdefault("ray_actor_options", {})["num_gpus"] = vlm_num_gpus
    app["deployments"] = deps
    return cfg


# "Uncapped" asks for most of the card: no cap at all would mean the engine's own default budget
# (an A10's, 21.5 GiB), which is not what an uncapped benchmark means.
UNCAPPED_GPU_FRACTION = 0.9


def memory_overrides(cap_gb: float | None) -> dict[str, Any]:
    """``engine`` memory fields for a cap in GB; ``None`` or <= 0 = uncapped (most of the card)."""
    if cap_gb is None or cap_gb <= 0:
        return {"max_gpu_memory_gb": None, "gpu_memory_fraction": UNCAPPED_GPU_FRACTION}
    return {"max_gpu_memory_gb": cap_gb, "gpu_memory_fraction": None}


def cpus_needed(cfg: dict[str, Any]) -> float:
    """Logical CPUs for every deployment at its max replicas (Ray refuses to place more)."""
    total = 0.0
    for d in cfg["applications"][0].get("deployments", []):
        reps = (d.get("autoscaling_config") or {}).get("max_replicas") or d.get("num_replicas") or 1
        total += reps * float((d.get("ray_actor_options") or {}).get("num_cpus", 1))
    return total


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


class LocalServe:
    """A private Ray cluster + Serve instance for the benchmark driver; ``deploy`` returns the URL."""

    def __init__(self, num_cpus: float, port: int | None = None, cache_dir: str | None = None,
                 env: dict[str, str] | None = None):
        import ray

        from serve_app.models import default_cache_dir

        self.cache_dir = cache_dir or default_cache_dir()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Serve reads some settings (autoscaling metric push intervals) from the environment of the
        # controller and replicas: set them here so the processes Ray starts inherit them.
        env = {"SERVE_APP_CACHE": self.cache_dir, **(env or {})}
        os.environ.update(env)
        # A whole number: on the two-GPU H200 machine ray.init(num_cpus=24.0) timed out at every
        # start (the raylet never registered) while num_cpus=24 started in 9 s.
        ray.init(address="local", num_cpus=math.ceil(num_cpus), namespace="serve", include_dashboard=False,
                 log_to_driver=bool(os.environ.get("LOADGEN_RAY_LOGS")),
                 runtime_env={"env_vars": env})
        self._client = None

    def deploy(self, cfg: dict[str, Any], timeout_s: float = 900) -> str:
        """Deploy (or replace) the app and wait until ``/readyz`` answers 200."""
        from ray import serve
        from ray.serve._private import api as _private_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        from serve_app.models import is_builtin, resolve_model

        cfg = copy.deepcopy(cfg)
        cfg["http_options"]["port"] = self.port
        engine = cfg["applications"][0]["args"]["engine"]
        engine.setdefault("cache_dir", self.cache_dir)
        if is_builtin(engine.get("model", "")):
            t = time.time()
            resolve_model(engine["model"], engine["cache_dir"])   # build once here, not per replica
            log.info("model %s ready in %.0f s", engine["model"], time.time() - t)
        schema = ServeDeploySchema.model_validate(cfg)
        if self._client is None:
            self._client = _private_api.serve_start(
                http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                grpc_options=gRPCOptions(**schema.grpc_options.model_dump()))
        else:
            self.delete()
        self._client.deploy_apps(schema, _blocking=False)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            st = serve.status().applications.get(APP_NAME)
            if st is not None and st.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy failed: {st.message}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5, trust_env=False).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"app not ready in {timeout_s:.0f} s")

    def delete(self) -> None:
        """Remove the app (its replicas and their GPU memory) and wait until it is gone."""
        from ray import serve

        serve.delete(APP_NAME, _blocking=True)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    def __enter__(self) -> "LocalServe":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def replica_counts(app: str = APP_NAME) -> dict[str, dict[str, int]]:
    """``{deployment: {state: count}}`` from ``serve.status()`` (RUNNING, STARTING, STOPPING, ...)."""
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return {}
    return {name: {str(getattr(k, "value", k)): int(v) for k, v in d.replica_states.items()}
            for name, d in st.deployments.items()}
