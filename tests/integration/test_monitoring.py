"""Debian's prometheus-postgres-exporter with monitoring/postgres_exporter.yaml, scraping a real
cluster as a pg_monitor role: every twotier metric is on /metrics, with the values twotier.stats
and twotier.status() have, and they move with the workload and with Redis going away."""
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import wait_for
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
EXPORTER = shutil.which("prometheus-postgres-exporter")


@pytest.fixture
def exporter(cluster):
    if EXPORTER is None:
        pytest.fail("prometheus-postgres-exporter is not installed (./run setup installs it)")
    cluster.sql("DROP ROLE IF EXISTS exporter")
    cluster.sql("CREATE ROLE exporter LOGIN IN ROLE pg_monitor")
    port = free_port()
    env = dict(os.environ, DATA_SOURCE_NAME=f"postgresql://exporter@127.0.0.1:{cluster.port}/postgres?sslmode=disable")
    proc = subprocess.Popen([EXPORTER, f"--web.listen-address=127.0.0.1:{port}",
                             f"--extend.query-path={ROOT / 'monitoring' / 'postgres_exporter.yaml'}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            return r.read().decode()

    assert wait_for(lambda: _up(scrape), timeout=15), "the exporter did not answer"
    yield scrape
    proc.terminate()
    out = proc.communicate(timeout=10)[0]
    if "twotier" in out and "error" in out.lower():
        print(out)


def _up(scrape) -> bool:
    try:
        scrape()
        return True
    except OSError:
        return False


def metric(text: str, name: str, cache: str | None = None) -> float | None:
    label = f'[^}}]*cache="{cache}"[^}}]*' if cache else "[^}]*"
    m = re.search(rf"^{name}{{{label}}} (\S+)$", text, re.M) or \
        (None if cache else re.search(rf"^{name} (\S+)$", text, re.M))
    return float(m.group(1)) if m else None


def test_exporter_reports_every_twotier_metric(cluster, redis_server, make_cache, exporter):
    cache = make_cache(rows=3)
    with cluster.connect() as c:
        for _ in range(3):
            cache.call(c, 1)
        c.execute("SET twotier.l1_enabled = off")
        cache.call(c, 1)
        cache.call(c, 2)
    text = exporter()
    st = cache.stats()
    assert metric(text, "twotier_cache_calls", cache.name) == st["calls"] == 5
    assert metric(text, "twotier_cache_l1_hits", cache.name) == st["l1_hits"] == 2
    assert metric(text, "twotier_cache_l2_hits", cache.name) == st["l2_hits"] == 1
    assert metric(text, "twotier_cache_misses", cache.name) == st["misses"] == 2
    assert metric(text, "twotier_cache_hit_ratio", cache.name) == pytest.approx(float(st["hit_ratio"]))
    assert metric(text, "twotier_cache_l1_hit_mean_us", cache.name) > 0
    assert metric(text, "twotier_cache_miss_p99_us", cache.name) > 0
    for name in ("negative_hits", "bypasses", "fills", "fills_rejected", "invalidations", "redis_errors",
                 "l2_skips", "stampede_waits", "too_large", "l2_hit_mean_us", "l2_hit_p99_us", "l1_hit_p99_us",
                 "miss_mean_us"):
        assert metric(text, f"twotier_cache_{name}", cache.name) is not None, name
    for name, want in (("l2_configured", 1), ("l2_reachable", 1), ("delivery_undelivered", 0), ("delivery_l2_trusted", 1),
                       ("l1_available", 1), ("l1_listener_subscribed", 1)):
        assert metric(text, f"twotier_status_{name}") == want, (name, metric(text, f"twotier_status_{name}"))
    assert metric(text, "twotier_status_l1_entries") >= 1  # key 2 was read with L1 off
    assert metric(text, "twotier_status_stats_slots") == 256
    assert metric(text, "twotier_status_stats_slots_in_use") >= 1

    # Redis away and a write: the exporter shows it unreachable and the ledger's backlog.
    redis_server.stop()
    try:
        cluster.sql(f"UPDATE {cache.name} SET ver = ver + 1 WHERE k = 1")
        assert wait_for(lambda: metric(exporter(), "twotier_status_delivery_undelivered") >= 1, timeout=10)
        assert wait_for(lambda: metric(exporter(), "twotier_status_delivery_failures") >= 1, timeout=10)
        assert wait_for(lambda: metric(exporter(), "twotier_status_delivery_oldest_undelivered_age_ms") > 0, timeout=10)
        text = exporter()
        assert metric(text, "twotier_status_l2_reachable") == 0
    finally:
        redis_server.start()
    assert wait_for(lambda: metric(exporter(), "twotier_status_delivery_undelivered") == 0, timeout=30)
    time.sleep(0.1)
