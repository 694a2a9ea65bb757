"""perf/plots.py turns bench_network's JSON into real PNGs: the lead's plots come from a run too long to redo."""
from __future__ import annotations

import json

from PIL import Image

from perf import plots


def chain(n: int, scale: float) -> dict:
    """A chain record shaped as bench_network writes it (figures made up: only the drawing is under test)."""
    contexts = {"128": 20.0, "2048": 9.0}
    return {"spans": [f"{i * 30 // n}:{(i + 1) * 30 // n}" for i in range(n)],
            "decode": {mode: {c: v * scale / (1 + 0.1 * n) for c, v in contexts.items()} for mode in ("relay", "push")},
            "floor": {mode: {c: v * scale for c, v in contexts.items()} for mode in ("relay", "push")},
            "forward": {"auto": {"1": 300.0 * scale, "64": 500.0 * scale * n},
                        "1": {"1": 290.0 * scale, "64": 480.0 * scale}}}


def results() -> dict:
    return {"model": "SmolLM2-135M-Instruct (30 blocks)", "date": "2026-11-23", "machine": "x86_64, 2 cores",
            "local": {"decode_steps_s": {"128": 20.0, "2048": 9.0}, "forward_tok_s": {"1": 320.0, "64": 520.0}},
            "profiles": {"loopback": {"link": None, "chains": {str(n): chain(n, 1.0) for n in (1, 2, 3)}},
                         "wan-100m-100ms": {"link": {"rtt_p50_ms": 101.2, "rtt_p90_ms": 102.0, "throughput_mbit": 95.6},
                                            "chains": {str(n): chain(n, 0.2) for n in (1, 2, 3)}}}}


def test_results_json_becomes_readable_pngs(tmp_path, capsys):
    source = tmp_path / "network.json"
    source.write_text(json.dumps(results()))
    paths = plots.main([str(source), "--out", str(tmp_path / "plots")])
    assert [p.name for p in paths] == ["network_decode.png", "network_forward.png"]
    assert "wrote" in capsys.readouterr().out
    for path in paths:
        with Image.open(path) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width >= 800 and image.height >= 600
            colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colors is None or len(colors) > 50  # bars, text and lines drawn, not a blank canvas
