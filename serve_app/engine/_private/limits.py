"""What a request may ask of one engine replica: checked before it is queued, on the event loop.

Why a value of its own: the checks need only a few numbers fixed at start-up (context length,
image token id, vision pass budget, KV pages), so an engine running in another process hands
them to the serving process once, and requests that can never run get their 400 at once there.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.engine.protocol import EngineRequest
from serve_app.errors import ServeAppError


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    merge: int                 # vision patches merged per side into one LM token
    image_token_id: int
    vision_budget: int         # patches per vision-tower pass
    page_size: int
    capacity_pages: int
    patch_dim: int

    def max_new(self, req: EngineRequest) -> int:
        return max(0, min(req.sampling.max_tokens, self.max_model_len - len(req.prompt_token_ids)))

    def check(self, req: EngineRequest) -> None:
        """Reject (400) what can never run; everything else waits for room."""
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ServeAppError("prompt is empty", 400, "empty_prompt")
        if n >= self.max_model_len:
            raise ServeAppError(f"prompt has {n} tokens; this model serves at most "
                                f"{self.max_model_len - 1} prompt tokens", 400,
                                "context_length_exceeded")
        want = sum(im.num_tokens(self.merge) for im in req.images)
        have = list(req.prompt_token_ids).count(self.image_token_id)
        if want != have:
            raise ServeAppError(f"prompt has {have} image tokens but the images need {want}", 400,
                                "image_token_mismatch")
        for im in req.images:
            t, h, w = im.grid_thw
            if t * h * w > self.vision_budget:
                raise ServeAppError(
                    f"an image has {t * h * w} patches ({h}x{w}); this engine encodes at most "
                    f"{self.vision_budget} per vision pass (max_prefill_tokens x "
                    f"{self.merge ** 2}): send a smaller image", 400, "image_too_large")
        if req.sampling.max_tokens < 1:
            raise ServeAppError("max_tokens must be at least 1", 400, "invalid_max_tokens", "max_tokens")
        need = n + self.max_new(req)
        if -(-need // self.page_size) > self.capacity_pages:      # pages, rounded up
            raise ServeAppError(f"request needs {need} tokens of KV cache; this replica holds "
                                f"{self.capacity_pages * self.page_size}", 400, "context_length_exceeded")
