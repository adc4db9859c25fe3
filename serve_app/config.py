"""Application settings: the ``args:`` block of ``deployments.yaml``, validated by pydantic.

Unknown keys are rejected so a typo in the config fails at deploy time, not silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.engine.config import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ImagesConfig(_Strict):
    """Limits and behaviour of the Preprocess deployment."""

    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="encoded bytes per image")
    max_decoded_pixels: int = Field(64_000_000, ge=1, description="checked from the header before decoding")
    max_aspect_ratio: float = Field(200.0, gt=1)
    min_pixels: int = Field(65_536, ge=1024, description="smart_resize lower bound (Qwen3-VL default)")
    max_pixels: int = Field(16_777_216, ge=1024, description="smart_resize upper bound (Qwen3-VL default)")
    allow_remote_urls: bool = Field(False, description="fetch http(s) image URLs at all")
    url_allowlist: list[str] = Field(default_factory=list,
                                     description="hosts (or *.suffix) that may be fetched")
    url_allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs exempt from the private-address refusal (tests, LANs)")
    url_timeout_s: float = Field(5.0, gt=0)
    url_max_redirects: int = Field(3, ge=0)
    cache_mb: int = Field(512, ge=0, description="LRU of preprocessed tensors by image id")
    upload_cache_mb: int = Field(256, ge=0, description="LRU of uploaded image bytes (image:// ids)")
    resize_threads: int = Field(
        4, ge=1, le=32, description="threads that share one image's resize and patch reorder (the "
                                    "same bytes as one thread; images under 0.3 MP stay on one): the "
                                    "resize is most of the time to a first token the serving layer "
                                    "adds: on an H200 host at 22 QPS (paced engine) that share fell from "
                                    "64 / 108 ms (P50 / P95) to 46 / 71 ms (RESULTS.md \"the serving "
                                    "layer's share of TTFT\"); with the model the app's TTFT P95 at 22 QPS "
                                    "did not move (the GPU's queue sets it); 1 = one thread per image")
    upload_store: Literal["actor", "local"] = Field(
        "actor", description="actor: uploads shared by all Preprocess replicas; local: per replica")


class ApiConfig(_Strict):
    """HTTP-level limits of the ingress, and request defaults and streaming of the VLM."""

    max_request_bytes: int = Field(96 * 1024 * 1024, ge=1024,
                                   description="whole request body; bigger bodies get 413")
    default_max_tokens: int = Field(512, ge=1, description="when the request gives none")
    stream_interval_ms: float = Field(
        0, ge=0, allow_inf_nan=False, description="VLM: merge a stream's tokens into at most one item per interval "
                             "(first text and the end go out at once); 0 = no time-based merging")
    max_messages: int = Field(256, ge=1)
    max_stop_sequences: int = Field(16, ge=0)
    enable_web_page: bool = Field(True, description="serve the small demo page at /")


class TablesConfig(_Strict):
    """The TableExtractor deployment."""

    enabled: bool = True
    route_table_questions: bool = Field(True, description="send table questions in chat to TableExtractor")
    providers: list[str] | None = Field(None, description="ONNX Runtime providers (default: CUDA if built in, else CPU)")
    threads: int | None = Field(None, ge=1, description="intra-op threads (default: the replica's CPUs)")
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_tables: int = Field(8, ge=1, description="most tables returned per image")
    max_concurrency: int = Field(1, ge=1, description="images extracted at once per replica")
    det_limit_side: int = Field(1280, ge=320, description="longest side the text detector sees")
    structure: Literal["auto", "slanet"] = "auto"
    model_paths: dict[str, str] | None = Field(None, description="{det|rec|table: path} overrides")


class AppConfig(_Strict):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    images: ImagesConfig = Field(default_factory=ImagesConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    tables: TablesConfig = Field(default_factory=TablesConfig)

    @property
    def served_model_name(self) -> str:
        return self.engine.served_model_name or self.engine.model.removeprefix("builtin:")
