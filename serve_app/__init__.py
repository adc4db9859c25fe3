"""serve_app: a Ray Serve application serving Qwen3-VL over an OpenAI-style HTTP API."""

__version__ = "0.1.0"
