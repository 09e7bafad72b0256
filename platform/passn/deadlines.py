"""What a call that waited past its deadline raises: which component did not answer, and within how long.

The component raising it (a sampler pool, an endpoint client, a verifier pool) names itself; the
job that set the deadline names its knob (``knob``), so the user reads
``sampling unit 0 did not answer within 30s (--sample-timeout to change)``.
"""

from __future__ import annotations


class DeadlinePassed(TimeoutError):
    def __init__(self, what: str, timeout_s: float, knob: str = "") -> None:
        super().__init__(what, timeout_s, knob)
        self.what, self.timeout_s, self.knob = what, timeout_s, knob

    def __str__(self) -> str:
        return f"{self.what} did not answer within {self.timeout_s:g}s" + (f" ({self.knob} to change)" if self.knob else "")
