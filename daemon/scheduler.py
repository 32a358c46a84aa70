"""Scheduled sampling runs (APScheduler 3.x BackgroundScheduler): `schedule.cron` or `schedule.interval`.

The job only *requests* a run from the sampler, which runs at most one at a time and queues one more;
APScheduler's own `max_instances=1` and `coalesce` keep missed firings from piling up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from poolwatch.pipeline.config import Config, ScheduleSettings, parse_interval

log = logging.getLogger(__name__)
JOB_ID = "sampling"


def make_trigger(settings: ScheduleSettings) -> CronTrigger | IntervalTrigger | None:
    if settings.cron:
        return CronTrigger.from_crontab(settings.cron)
    if settings.interval:
        return IntervalTrigger(seconds=parse_interval(settings.interval))
    return None


class Scheduler:
    """A daemon component; the schedule comes from the settings snapshot at start and at `apply`."""

    name = "scheduler"

    def __init__(self, settings: Callable[[], Config], request: Callable[[str], object]) -> None:
        self.settings = settings
        self._request = request
        self._scheduler: BackgroundScheduler | None = None
        self.description = "none"

    def _fire(self) -> None:
        self._request("schedule")

    def apply(self, settings: ScheduleSettings) -> None:
        """Install (or replace, on reload) the sampling schedule."""
        if self._scheduler is None:
            return
        trigger = make_trigger(settings)
        if self._scheduler.get_job(JOB_ID):
            self._scheduler.remove_job(JOB_ID)
        self.description = (f"cron {settings.cron!r}" if settings.cron
                            else f"every {settings.interval}" if settings.interval else "none")
        if trigger is not None:
            self._scheduler.add_job(self._fire, trigger, id=JOB_ID, name="sampling run")
        log.info("sampling schedule: %s", self.description)

    def start(self) -> None:
        self._scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True,
                                                            "misfire_grace_time": 60})
        self.apply(self.settings().schedule)
        self._scheduler.start()

    def alive(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.running)

    def health(self) -> str:
        return self.description if self.alive() else "DEAD"

    def request_stop(self) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> bool:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        return True
