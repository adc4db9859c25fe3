"""Temporary stage timestamps for the serving path (not for commit): run in a checkout, then
mkdir -p /tmp/trace; python benchmarks/serving_overhead.py --qps 3 --seconds 40 --idle-seconds 3
--cpus 8 --tpot-ms 6 --out OUT; python trace_sum.py OUT/load/run.json /tmp/trace; git checkout serve_app/.
Applied to d418f98 on the 2-core VM, 2026-11-30 ~18:15 UTC (files in trace/)."""
# temporary instrumentation (reverted after): JSON lines of stage times per process
import re
def patch(path, pairs):
    s = open(path).read()
    for old, new in pairs:
        assert old in s, (path, old)
        s = s.replace(old, new, 1)
    open(path, "w").write(s)
T = "import json as _j, os as _o, time as _t\ndef _tr(**k):\n    open(f'/tmp/trace/{_o.getpid()}.jsonl', 'a').write(_j.dumps(k) + '\\n')\n"
if __name__ == "__main__":
    patch("serve_app/ingress.py", [
     ("            images = self.preprocess.process.remote(sources, body.min_pixels, body.max_pixels)\n", "            _t_pre = _t.time()\n            images = self.preprocess.process.remote(sources, body.min_pixels, body.max_pixels)\n"),
     ("import asyncio\n", "import asyncio\n" + T),
     ("        _chat.check_request(body, self.cfg, self.served_name)\n", "        _t_in = _t.time()\n        _chat.check_request(body, self.cfg, self.served_name)\n"),
     ("        n_prompt = accepted.num_prompt_tokens\n", "        n_prompt = accepted.num_prompt_tokens\n        _tr(c='ing', rid=request_id, t_in=_t_in, t_acc=_t.time(), t_pre=locals().get('_t_pre'))\n"),
     ("            return StreamingResponse(self._stream(gen, sse, n_prompt),", "            return StreamingResponse(self._stream(gen, sse, n_prompt, request_id),"),
     ("    async def _stream(self, gen, sse: _chat.SSEWriter, n_prompt: int):\n        finish, n_gen, done = None, 0, False\n",
      "    async def _stream(self, gen, sse: _chat.SSEWriter, n_prompt: int, rid=None):\n        finish, n_gen, done = None, 0, False\n        _first = True\n"),
     ("                if d.text:\n                    yield sse.content(d.text)\n", "                if d.text:\n                    if _first:\n                        _tr(c='ing1', rid=rid, t=_t.time()); _first = False\n                    yield sse.content(d.text)\n"),
    ])
    patch("serve_app/vlm.py", [
     ("from __future__ import annotations\n", "from __future__ import annotations\n" + T),
     ("        t0 = time.perf_counter()\n        ids = self.prompts.build(messages, images)\n",
      "        t0 = time.perf_counter()\n        _a = _t.time()\n        ids = self.prompts.build(messages, images)\n        _b = _t.time()\n"),
     ("                if first and delta.token_ids:\n", "                if first and delta.token_ids:\n                    _tr(c='vlm', rid=request_id, t_gen=_a, t_built=_b, t_first=_t.time())\n"),
    ])
    patch("serve_app/preprocess.py", [
     ("from __future__ import annotations\n", "from __future__ import annotations\n" + T),
     ("        self._m_latency.observe(time.perf_counter() - t0)\n", "        self._m_latency.observe(time.perf_counter() - t0)\n        _tr(c='pre', t_end=_t.time(), dur=time.perf_counter() - t0, n=len(out), t_start=_t0w)\n"),
     ("        t0 = time.perf_counter()\n        try:\n            self.pipeline.check_count", "        t0 = time.perf_counter()\n        _t0w = _t.time()\n        try:\n            self.pipeline.check_count"),
    ])
