import pytest

from runtimes.measure.membw import measure_read_bandwidth


def test_bandwidth_probe_reports_a_plausible_rate():
    r = measure_read_bandwidth(size_mib=64, threads=1, passes=3)
    assert r.bytes_per_pass == 64 << 20
    assert 0.1 < r.median_gbps <= r.best_gbps < 10_000
    assert set(r.to_dict()) == {"bytes_per_pass", "threads", "passes", "best_gbps", "median_gbps"}


def test_bandwidth_probe_rejects_nonsense():
    with pytest.raises(ValueError):
        measure_read_bandwidth(size_mib=0)
