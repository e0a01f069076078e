"""The device-idle accounting of bench/profile_decode.py, on synthetic profiler events."""

from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from ember.bench.profiling import idle_gaps


def _event(name: str, start: float, end: float, device: DeviceType = DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_idle_gaps_merge_overlapping_operations_and_skip_host_events():
    events = [_event("gemv", 0, 10), _event("attention", 8, 12),  # overlapping (PDL): no gap
              _event("cudaGraphLaunch", 12, 40, DeviceType.CPU),  # host side: not device time
              _event("memcpy", 15, 16), _event("argmax", 16, 20), _event("gemv", 30, 31)]
    span, idle, gaps = idle_gaps(events)
    assert span == 31
    assert idle == 3 + 10
    assert gaps == [(10, "argmax", "gemv"), (3, "attention", "memcpy")]
    assert idle_gaps([]) == (0.0, 0.0, [])


def test_gc_pauses_records_each_collection_only_while_active():
    import gc

    from ember.bench.profiling import GcPauses

    with GcPauses() as pauses:
        gc.collect(0)
        gc.collect()
    gc.collect()  # after the block: not recorded
    gens = [g for g, _ in pauses.runs]  # an automatic young collection may slip in as well
    assert gens[-1] == 2 and 0 in gens and gens.count(2) == 1
    assert all(us >= 0 for _, us in pauses.runs)
    summary = pauses.summary()
    assert summary["collections"] == len(gens) and summary["full_collections"] == 1
    assert summary["max_us"] <= summary["total_us"]
