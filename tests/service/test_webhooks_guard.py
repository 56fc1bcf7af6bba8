"""The webhook SSRF guard and the retry schedule: what is refused at submit and at delivery, how a
connection is pinned to the checked address, and when each retry is due."""

from __future__ import annotations

import datetime as dt
import email.utils
import random
import socket

import pytest

from kiln.config import load_settings
from kiln.errors import InvalidRequest
from kiln.service.webhooks_delivery import SPEC_SCHEDULE_S, retry_after_of, retry_delay_s
from kiln.service.webhooks_guard import check_url, pin


def resolver(*addresses: str):  # type: ignore[no-untyped-def]
    """A fake DNS answer (the one thing here that cannot be real: a public name resolving privately)."""
    def resolve(host, port, type=0):  # type: ignore[no-untyped-def]  # noqa: A002 - getaddrinfo's name
        family = socket.AF_INET6 if ":" in addresses[0] else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port)) for address in addresses]
    return resolve


@pytest.mark.parametrize("url", [
    "ftp://example.com/x", "file:///etc/passwd", "gopher://example.com/", "not a url", "http://",
    "http://user:pw@example.com/hook", "http://127.0.0.1/", "http://127.1.2.3:8080/x", "http://10.0.0.5/",
    "http://172.16.0.1/", "http://192.168.1.1/", "http://100.64.0.1/", "http://169.254.169.254/latest/meta-data",
    "http://169.254.10.10/", "http://[::1]/", "http://[fd00:ec2::254]/", "http://[fe80::1]/", "http://[fc00::1]/",
    "http://[::ffff:127.0.0.1]/", "http://224.0.0.1/", "http://0.0.0.0/", "http://240.0.0.1/",
    "http://localhost:8080/", "http://api.localhost/", "https://example.com/" + "x" * 2100,
])
def test_refused_at_submit(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_url(url)
    assert refused.value.param == "webhook_url"


@pytest.mark.parametrize("url", ["https://hooks.example.com/kiln", "http://example.com:8080/a?b=c",
                                 "http://93.184.216.34/hook", "https://[2606:2800:220:1::]/hook"])
def test_public_urls_pass_at_submit(url: str) -> None:
    assert str(check_url(url)).startswith(url.split("/")[0])


def test_private_addresses_pass_when_allowed_but_metadata_never() -> None:
    for url in ("http://127.0.0.1:9000/", "http://10.1.2.3/", "http://localhost:9000/", "http://[::1]:9/"):
        check_url(url, allow_private=True)
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://[::ffff:169.254.169.254]/"):
        with pytest.raises(InvalidRequest):
            check_url(url, allow_private=True)


def test_a_name_is_resolved_once_and_the_connection_pinned_to_the_checked_address() -> None:
    target = pin("https://hooks.example.com:8443/kiln?x=1", resolve=resolver("93.184.216.34"))
    assert str(target.url) == "https://93.184.216.34:8443/kiln?x=1"
    assert target.host_header == "hooks.example.com:8443"
    assert target.extensions == {"sni_hostname": "hooks.example.com"}  # the certificate is checked against the name
    plain = pin("http://hooks.example.com/kiln", resolve=resolver("2606:2800:220:1::"))
    assert str(plain.url) == "http://[2606:2800:220:1::]/kiln" and plain.host_header == "hooks.example.com"
    assert plain.extensions == {}


@pytest.mark.parametrize("answer", [("10.0.0.7",), ("93.184.216.34", "127.0.0.1"), ("169.254.169.254",),
                                    ("::1",), ("100.100.1.1",)])
def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(answer: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as refused:
        pin("https://rebound.example.com/hook", resolve=resolver(*answer))
    assert "rebound.example.com resolves to" in refused.value.message


def test_a_real_lookup_of_localhost_is_pinned_only_when_private_is_allowed() -> None:
    with pytest.raises(InvalidRequest):
        pin("http://localhost:9/hook")
    target = pin("http://localhost:9/hook", allow_private=True)
    assert target.address in ("127.0.0.1", "::1") and target.host_header == "localhost:9"


def test_the_default_schedule_is_the_spec_s_and_retries_are_jittered_around_it() -> None:
    assert tuple(load_settings().webhook_retry_schedule_s) == SPEC_SCHEDULE_S
    rng = random.Random(7)
    assert retry_delay_s(SPEC_SCHEDULE_S, 0, rng=rng) == 0.0  # the first try: now
    for attempts, base in enumerate(SPEC_SCHEDULE_S):
        delays = [retry_delay_s(SPEC_SCHEDULE_S, attempts, rng=rng) for _ in range(50)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays), (attempts, delays)
        if base:
            assert len(set(delays)) > 1  # jittered, not a thundering herd
    assert retry_delay_s(SPEC_SCHEDULE_S, len(SPEC_SCHEDULE_S)) is None  # ten tries, then given up


def test_retry_after_is_honoured_but_capped_at_the_schedule_s_longest() -> None:
    assert retry_delay_s(SPEC_SCHEDULE_S, 1, retry_after_s=120.0) == 120.0
    assert retry_delay_s(SPEC_SCHEDULE_S, 1, retry_after_s=10 * 86400.0) == 86400.0
    assert 4.0 <= retry_delay_s(SPEC_SCHEDULE_S, 1, retry_after_s=1.0) <= 6.0  # never sooner than the schedule
    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    assert retry_after_of("30") == 30.0
    assert retry_after_of(email.utils.format_datetime(now + dt.timedelta(seconds=90), usegmt=True), now) == 90.0
    assert retry_after_of("soon") is None and retry_after_of(None) is None
