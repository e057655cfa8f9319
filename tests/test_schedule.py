"""The schedule, backoff, expiry warnings and clock handling, with the clock driven.

The daemon runs in-process against the real loopback fakes; freezegun freezes time and a
driven event loop advances it by exactly the timeout the daemon asked to sleep, so a day of
refreshes takes milliseconds and every wait the daemon chose can be asserted.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from freezegun import freeze_time
from freezegun.api import FrozenDateTimeFactory

from tests.conftest import APP_KEY, APP_SECRET, REFRESH_TOKEN, Bundle
from tests.fakes.bot import FakeBot
from tests.fakes.schwab import FakeSchwab
from tests.sender_module import OffsetClock, tsr

START = "2026-12-03 12:00:00"
HOUR = 3600.0
LOGGER = "token_refresh_sender"


@dataclass
class DrivenLoop:
    """Stands in for EventLoop: a wait advances the frozen clock instead of sleeping."""

    frozen: FrozenDateTimeFactory
    signals: Any
    max_waits: int
    before_wait: Optional[Callable[[int], None]] = None
    waits: List[float] = field(default_factory=list)

    def wait(self, timeout: float) -> Set[Path]:
        self.waits.append(timeout)
        if self.before_wait is not None:
            self.before_wait(len(self.waits))
        self.frozen.tick(timeout)
        if len(self.waits) >= self.max_waits:
            self.signals.stop = True
        return set()


@dataclass
class Rig:
    daemon: Any
    loop: DrivenLoop
    clock: OffsetClock
    jitter_calls: List[Tuple[float, float]]

    def run(self) -> int:
        code: int = self.daemon.run()
        return code


@pytest.fixture
def frozen() -> Iterator[FrozenDateTimeFactory]:
    with freeze_time(START) as factory:
        yield factory


def make_rig(
    bundle: Bundle,
    schwab: FakeSchwab,
    bot: FakeBot,
    frozen: FrozenDateTimeFactory,
    max_waits: int,
    environ: Optional[Dict[str, str]] = None,
    **settings: Any,
) -> Rig:
    bundle.write_settings(**settings)
    overrides = {"token_url": schwab.url, "socket_path": str(bot.path), "log_file": "-",
                 "state_file": str(bundle.state_file)}
    loaded = tsr.load_settings(bundle.settings, True, overrides)
    signals = tsr.Signals()
    jitter_calls: List[Tuple[float, float]] = []

    def upper_bound(low: float, high: float) -> float:
        jitter_calls.append((low, high))
        return high

    clock = OffsetClock()
    sender = tsr.Sender(loaded, tsr.load_app_config(bundle.app_config),
                        tsr.TokenStore(bundle.token_file), signals, tsr.Notifier(environ or {}),
                        tsr.StateFile(bundle.state_file), rng=upper_bound, clock=clock)
    loop = DrivenLoop(frozen, signals, max_waits)
    return Rig(tsr.Daemon(sender, loop), loop, clock, jitter_calls)


def refreshes(schwab: FakeSchwab) -> int:
    return sum(1 for r in schwab.token_requests if r.grant_type == "refresh_token")


# -- when to refresh ----------------------------------------------------------------------


def test_valid_token_on_disk_is_delivered_at_start_without_a_refresh(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    written = bundle.write_tokens(valid_for=1800)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=1)
    assert rig.run() == 0
    assert refreshes(schwab) == 0
    assert [r.payload["access_token"] for r in bot.received] == [written["token"]["access_token"]]
    # The first sleep lasts until expires_at - refresh_margin_seconds (600 s).
    assert rig.loop.waits[0] == pytest.approx(1200, abs=1)


def test_token_within_the_margin_is_refreshed_before_anything_else(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=300)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=1)
    rig.run()
    assert refreshes(schwab) == 1
    issued = schwab.latest
    assert issued is not None
    assert [r.payload["access_token"] for r in bot.received] == [issued.access_token]


def test_refreshes_follow_expires_at_so_the_bot_always_has_ten_minutes_to_spare(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=-1)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=6)
    held: List[Tuple[float, int]] = []  # (driven time, expires_at the bot holds)

    def note(_wait_number: int) -> None:
        held.append((time.time(), bot.received[-1].payload["expires_at"]))

    rig.loop.before_wait = note
    rig.run()
    assert refreshes(schwab) == 6
    assert all(wait == pytest.approx(1200, abs=1) for wait in rig.loop.waits)
    assert len({expires_at for _, expires_at in held}) == 6, "each refresh reached the bot"
    for (_, previous), (replaced_at, _) in zip(held, held[1:]):
        spare = previous - replaced_at
        assert spare >= 600, "the next token must arrive 10 minutes before the bot needs it"


def test_long_lived_tokens_are_still_refreshed_every_max_refresh_interval(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    schwab.lifetime = 7200
    bundle.write_tokens(valid_for=-1)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=3)
    rig.run()
    assert rig.loop.waits == [pytest.approx(1500, abs=1)] * 3


def test_a_margin_longer_than_the_token_lifetime_does_not_cause_a_refresh_storm(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    schwab.lifetime = 600
    bundle.write_tokens(valid_for=-1)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=4, refresh_margin_seconds=900)
    rig.run()
    assert refreshes(schwab) == 4
    assert rig.loop.waits == [pytest.approx(300, abs=1)] * 4  # half the lifetime


def test_idle_daemon_sleeps_until_the_refresh_or_the_watchdog_and_nothing_else(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=1800)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=1)
    rig.run()
    assert rig.loop.waits == [pytest.approx(1200, abs=1)]
    with_watchdog = make_rig(bundle, schwab, bot, frozen, max_waits=5,
                             environ={"WATCHDOG_USEC": "60000000"})
    with_watchdog.run()
    assert with_watchdog.loop.waits == [pytest.approx(30, abs=0.01)] * 5


# -- failures -----------------------------------------------------------------------------


def test_transient_failures_back_off_exponentially_with_full_jitter(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=-1)
    schwab.script("server_error", times=5)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=6, backoff_initial_seconds=5,
                   backoff_max_seconds=30)
    rig.run()
    # Jitter is drawn from [0, ceiling]; the ceiling doubles up to backoff_max_seconds.
    assert rig.jitter_calls == [(0, 5), (0, 10), (0, 20), (0, 30), (0, 30)]
    assert rig.loop.waits[:5] == [5, 10, 20, 30, 30]
    assert refreshes(schwab) == 6  # recovered on the sixth attempt, without a restart
    issued = schwab.latest
    assert issued is not None and bot.received[-1].payload["access_token"] == issued.access_token


def test_retry_after_is_honoured_even_when_the_jitter_is_shorter(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=-1)
    schwab.script("rate_limited", retry_after=42)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=2, backoff_max_seconds=300)
    rig.run()
    assert rig.loop.waits[0] == 42
    assert refreshes(schwab) == 2


def test_a_rejected_refresh_token_stops_calls_and_keeps_the_valid_token_for_the_bot(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    written = bundle.write_tokens(valid_for=500)  # inside the margin: refresh at once
    schwab.script("invalid_grant")

    def restart_bot(wait_number: int) -> None:
        if wait_number == 2:
            bot.restart()

    rig = make_rig(bundle, schwab, bot, frozen, max_waits=3)
    rig.loop.before_wait = restart_bot
    with caplog.at_level(logging.INFO, LOGGER):
        rig.run()
    assert refreshes(schwab) == 1, "a rejected refresh token must not be retried"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "new login is needed" in errors[0]
    assert "run_token_sender.sh --login" in errors[0]
    # The daemon does not wake for refreshes any more: only when the access token dies.
    assert rig.loop.waits[0] == pytest.approx(501, abs=1)
    assert bundle.read_tokens() == written


# -- the token file -----------------------------------------------------------------------


def test_refresh_keeps_creation_timestamp_and_every_unknown_field(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    written = bundle.write_tokens(valid_for=-1, age=3 * 86400)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=3)
    rig.run()
    after = bundle.read_tokens()
    assert refreshes(schwab) == 3
    assert after["creation_timestamp"] == written["creation_timestamp"]
    assert after["x_unknown_top_level"] == "kept"
    assert after["token"]["x_unknown_token_field"] == {"kept": True}
    issued = schwab.latest
    assert issued is not None
    assert after["token"]["access_token"] == issued.access_token
    assert after["token"]["id_token"] == issued.id_token
    assert after["token"]["refresh_token"] == REFRESH_TOKEN  # none rotated: the old one stays
    assert after["token"]["expires_at"] == int(time.time()) - 1200 + 1800


def test_a_rotated_refresh_token_is_stored_and_used_for_the_next_refresh(
    bundle: Bundle, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    with FakeSchwab(APP_KEY, APP_SECRET, REFRESH_TOKEN, rotate=True) as rotating:
        bundle.write_tokens(valid_for=-1)
        rig = make_rig(bundle, rotating, bot, frozen, max_waits=3)
        rig.run()
        assert refreshes(rotating) == 3
        assert all(r.status == 200 for r in rotating.token_requests)
        latest = rotating.latest
        assert latest is not None
        assert bundle.read_tokens()["token"]["refresh_token"] == latest.refresh_token


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "UTC", "America/New_York"])
def test_expires_at_is_the_same_unix_time_in_every_time_zone(
    zone: str, bundle: Bundle, schwab: FakeSchwab, bot: FakeBot,
    frozen: FrozenDateTimeFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        bundle.write_tokens(valid_for=-1)
        rig = make_rig(bundle, schwab, bot, frozen, max_waits=1)
        rig.run()
    finally:
        monkeypatch.undo()
        time.tzset()
    from datetime import datetime, timezone

    start = datetime(2026, 12, 3, 12, tzinfo=timezone.utc).timestamp()
    assert bundle.read_tokens()["token"]["expires_at"] == int(start) + 1800


# -- the refresh token's weekly death -----------------------------------------------------


def age_warnings(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if "refresh token expire" in r.getMessage()]


def test_expiry_warning_names_the_time_in_local_and_utc_and_repeats_every_six_hours(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        bundle.write_tokens(valid_for=-1, age=7 * 86400 - 40 * HOUR)  # 40 h left
        rig = make_rig(bundle, schwab, bot, frozen, max_waits=19)  # 19 x 20 min = 6 h 20 m
        with caplog.at_level(logging.INFO, LOGGER):
            rig.run()
    finally:
        monkeypatch.undo()
        time.tzset()
    warnings = age_warnings(caplog)
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    first = warnings[0].getMessage()
    assert "expires in 1d 16h" in first
    assert "2026-12-05 13:00:00 JST (2026-12-05 04:00:00 UTC)" in first
    assert "--login" in first
    assert warnings[1].created - warnings[0].created >= 6 * HOUR


def test_in_the_last_twelve_hours_every_refresh_warns(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle.write_tokens(valid_for=-1, age=7 * 86400 - 10 * HOUR)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=4)
    with caplog.at_level(logging.INFO, LOGGER):
        rig.run()
    assert refreshes(schwab) == 4
    assert len(age_warnings(caplog)) == 4


def test_an_expired_refresh_token_is_reported_once_as_an_error(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle.write_tokens(valid_for=-1, age=7 * 86400 + HOUR)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=4)
    with caplog.at_level(logging.INFO, LOGGER):
        rig.run()
    reports = age_warnings(caplog)
    assert [r.levelno for r in reports] == [logging.ERROR]
    assert "1h 0m ago" in reports[0].getMessage()


def test_no_warning_while_plenty_of_refresh_token_life_remains(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle.write_tokens(valid_for=-1, age=86400)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=3)
    with caplog.at_level(logging.INFO, LOGGER):
        rig.run()
    assert age_warnings(caplog) == []


# -- clock jumps --------------------------------------------------------------------------


def test_wall_clock_jump_forward_causes_one_refresh_not_a_burst(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=1800)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=5)

    def jump(wait_number: int) -> None:
        if wait_number == 1:
            rig.clock.offset = HOUR  # e.g. NTP stepping the clock

    rig.loop.before_wait = jump
    rig.run()
    # The token looks expired after the jump: one refresh, then the normal rhythm.
    assert refreshes(schwab) == 4
    assert rig.loop.waits[1:] == [pytest.approx(1200, abs=1)] * 4


def test_wall_clock_jump_backward_still_refreshes_within_the_max_interval(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=-1)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=4)

    def jump(wait_number: int) -> None:
        if wait_number == 1:
            rig.clock.offset = -HOUR

    rig.loop.before_wait = jump
    rig.run()
    assert refreshes(schwab) == 4
    # Measured on the monotonic clock: max_refresh_interval_seconds bounds every wait.
    assert max(rig.loop.waits) <= 1500 + 1


def test_state_file_records_outcomes_and_no_secret(
    bundle: Bundle, schwab: FakeSchwab, bot: FakeBot, frozen: FrozenDateTimeFactory
) -> None:
    bundle.write_tokens(valid_for=-1)
    rig = make_rig(bundle, schwab, bot, frozen, max_waits=1)
    rig.run()
    state = bundle.read_state()
    assert state["last_refresh"]["outcome"] == "ok"
    assert state["last_delivery"]["outcome"] == "delivered"
    assert state["consecutive_failures"] == 0
    assert state["access_token_expires_at"] == bundle.read_tokens()["token"]["expires_at"]
    text = json.dumps(state)
    for value in schwab.secret_values() | {REFRESH_TOKEN}:
        assert value not in text
    assert bundle.state_file.stat().st_mode & 0o002 == 0
