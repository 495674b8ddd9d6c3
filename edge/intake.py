"""Back-pressure: the bounds that pause the intake and the decision that resumes it.

Every bound on what waits in memory between the broker and the model lives here:

- ``max_queued_inputs`` (``limits.max_queued_inputs``): inputs queued for one model that pause
  the intake; it resumes once every model queue is down to half of it.
- :data:`ANSWERS_QUEUED_HIGH` (or half of ``mqtt.publish_queue``, if smaller): answers in the
  link's outgoing queue, while connected, that pause the intake and stop making answers; it may
  resume once they are down to half of that (a quarter of ``mqtt.publish_queue``).
- :data:`HOLD_MAX`: inputs the link holds while paused before it stops reading the socket
  (further inputs wait, unacknowledged, in the broker and the TCP buffers).

The resume is driven by progress, not by a clock: the batcher reports each batch it takes
(:meth:`Intake.may_resume` with reason ``"batch"``) and the link each time it hands answers to
the socket (reason ``"answers"``), so the intake opens again the moment there is room. The only
timer left while paused is the keepalive read (``mqtt.keepalive / 3``) that lets PINGRESPs and
PUBACKs in while the socket is not read; it re-checks too (reason ``"watchdog"``), as a safety
net that the tests show is never the one that resumes.

The class holds plain values only (no I/O), so it is tested with numbers
(tests/test_intake.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

ANSWERS_QUEUED_HIGH = 1024  # answers in the link's queue, while connected, that pause the intake
HOLD_MAX = 500  # inputs held while intake is paused before the socket is no longer read


@dataclass
class Intake:
    """The back-pressure bounds and the pause/resume decision (plain values, no I/O)."""

    max_queued_inputs: int
    publish_queue: int
    hold_max: int = HOLD_MAX
    answers_high_cap: int = ANSWERS_QUEUED_HIGH
    paused: bool = False
    pauses: int = 0
    resumes: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def inputs_low(self) -> int:
        return self.max_queued_inputs // 2

    @property
    def answers_high(self) -> int:
        return min(self.publish_queue // 2, self.answers_high_cap)

    @property
    def answers_low(self) -> int:
        return min(self.publish_queue // 4, self.answers_high_cap // 2)

    def inputs_full(self, queued: int) -> bool:
        """One model's queue holds ``queued`` inputs: pause the intake?"""
        return queued >= self.max_queued_inputs

    def outgoing_full(self, answers: int) -> bool:
        """Answers are made faster than the broker takes them: pause, stop making answers."""
        return answers >= self.answers_high

    def outgoing_drained(self, answers: int) -> bool:
        return answers <= self.answers_low

    def hold_full(self, held: int) -> bool:
        """The link holds ``held`` inputs while paused: stop reading the socket?"""
        return held >= self.hold_max

    def may_read_again(self, held: int) -> bool:
        return held < self.hold_max // 2

    def pause(self) -> bool:
        """Pause; ``False`` when already paused."""
        if self.paused:
            return False
        self.paused = True
        self.pauses += 1
        return True

    def may_resume(self, queued: Iterable[int], answers: int, reason: str) -> bool:
        """Something made room (``reason``: ``"batch"``, ``"answers"``, ``"watchdog"``...):
        resume when paused, every model queue is at or below half of ``max_queued_inputs`` and
        the outgoing queue has drained. Counts the resume under its reason."""
        if not self.paused:
            return False
        low = self.inputs_low
        if not self.outgoing_drained(answers) or any(q > low for q in queued):
            return False
        self.paused = False
        self.resumes[reason] = self.resumes.get(reason, 0) + 1
        return True

    def reset(self) -> None:
        """A new connection reads from the start: not paused."""
        self.paused = False
