"""`Usage.as_dict`: what `dataclasses.asdict` gave (every field but unset optional ones,
`max_rss_mb` always), and a copy the caller may change without touching the usage."""

from __future__ import annotations

from dataclasses import asdict

from pluginpool.pool.runner import Usage


def test_as_dict_is_asdict_less_unset_optionals_and_a_copy() -> None:
    usage = Usage(wall_ms=1.5, cpu_ms=1.0, cpu_percent=66.7, peak_memory_mb=0.4,
                  max_rss_mb=None, network_requests=0, storage_kb=0.0, sandboxed=True,
                  layers={"seccomp": True, "zygote_layers": {"landlock": 3}},
                  warm={"zygote_pid": 10, "runs": 2})
    expected = {k: v for k, v in asdict(usage).items() if v is not None or k == "max_rss_mb"}
    out = usage.as_dict()
    assert out == expected
    assert "stop_latency_ms" not in out and out["max_rss_mb"] is None
    out["layers"]["zygote_layers"]["landlock"] = 0
    out["warm"]["runs"] = 99
    assert usage.layers["zygote_layers"] == {"landlock": 3} and usage.warm == {
        "zygote_pid": 10, "runs": 2}
