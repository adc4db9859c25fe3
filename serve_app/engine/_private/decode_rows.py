"""Which admitted requests decode this step when ``engine.max_decode_rows`` is below ``max_num_seqs``.

The rows past the limit have their first token and wait for a decode row. A row, once given, is
kept until the request ends (taking it back would stall a stream mid-answer). A free row goes to
the first joined (``decode_order: arrival``) or to the waiting request with the least laxity
(``laxity``): the smallest ``arrival - tokens_left x step_s``, the one whose answer would end
latest after its arrival if it waited. On one row that order gives the smallest worst
arrival-to-end time (earliest deadline first, each request's latest start its deadline); with
many rows it is a heuristic. Long answers set the e2e tail, and short ones have room to wait.
"""

from __future__ import annotations

from serve_app.engine._private.sequence import Seq


def pick(rows: list[Seq], limit: int, order: str, step_s: float) -> list[Seq]:
    """At most ``limit`` of ``rows`` (in join order). A row has decoded once it has launched more
    than its prefill's first token (only decode steps launch more)."""
    if len(rows) <= limit or order != "laxity":
        return rows[:limit]
    keep = [s for s in rows if s.launched > 1][:limit]
    wait = sorted((s for s in rows if s.launched <= 1), key=lambda s: s.arrival - (s.max_new - s.launched) * step_s)
    return keep + wait[:limit - len(keep)]
