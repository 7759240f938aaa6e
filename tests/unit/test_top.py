"""cli/top.py: one frame of `moefleet top` shades each expert by its load relative to the
hottest, prints its replica count, truncates a layer wider than the screen with "+N", and
shows each host's slot use.
"""

from __future__ import annotations

import pytest

from moefleet.cli.top import SHADES, render
from moefleet.protos import admin_pb2 as pb

pytestmark = pytest.mark.unit


def _expert(e: int, tokens_per_s: float, replicas: int) -> pb.ExpertStatus:
    return pb.ExpertStatus(expert=e, tokens_per_s=tokens_per_s, target_replicas=replicas,
                           replicas=[pb.ReplicaStatus(host=f"h{r % 2}", slot=r) for r in range(replicas)])


def _status(layer3: list[tuple[float, int]]) -> pb.StatusResponse:
    """Layer 1: four experts, hottest 200 tokens/s; layer 3 as given (tokens/s, replicas)."""
    layer1 = [(0.0, 1), (100.0, 2), (200.0, 3), (50.0, 0)]
    layers = [pb.LayerStatus(layer=L, experts=[_expert(e, t, r) for e, (t, r) in enumerate(rows)])
              for L, rows in ((1, layer1), (3, layer3))]
    model = pb.ModelStatus(name="tiny", routing_version=7, layers=layers,
                           autoscaling=pb.AutoscalingStatus(enabled=True),
                           latency_p50_s=0.0125, latency_p99_s=0.25, requests_per_s=3.5)
    hosts = [pb.HostStatus(id="tiny-host-0", node_ip="10.0.0.1", device="cpu", slots_total=16,
                           slots_used=3),
             pb.HostStatus(id="tiny-host-1", node_ip="10.0.0.2", device="cuda:0", slots_total=8,
                           slots_used=8)]
    return pb.StatusResponse(models=[model], hosts=hosts)


def _row(frame: str, layer: int) -> str:
    return next(line for line in frame.splitlines() if line.startswith(f"  L{layer} "))


def test_hottest_expert_gets_the_last_shade_and_idle_experts_a_space() -> None:
    frame = render(_status([(20.0, 1), (0.0, 1)]))
    # layer 1: 0 -> " ", 100/200 -> round(4.5) = 4 "=", 200 -> "@", 50/200 -> round(2.25) = 2 ":"
    assert _row(frame, 1) == "  L1    " + " =@:" + "  " + "1230"
    # layer 3 is shaded against the model's hottest (200): 20/200 -> round(0.9) = 1 "."
    assert _row(frame, 3) == "  L3    " + ". " + "  " + "11"
    assert SHADES[-1] == "@" and SHADES[0] == " "


def test_any_load_at_all_is_never_shaded_as_idle() -> None:
    frame = render(_status([(0.01, 1), (200.0, 1)]))
    # 0.01/200 rounds to shade 0, but any load at all shows as the coolest load
    assert _row(frame, 3) == "  L3    " + ".@" + "  " + "11"


def test_replica_counts_appear_in_expert_order_and_ten_or_more_as_plus() -> None:
    frame = render(_status([(100.0, 9), (200.0, 10), (0.0, 0), (150.0, 4)]))
    # 150/200 -> round(6.75) = 7 "#"
    assert _row(frame, 3) == "  L3    " + "=@ #" + "  " + "9+04"


def test_model_header_sums_the_load_and_gives_latency_in_ms() -> None:
    header = render(_status([(25.0, 1)])).splitlines()[0]
    assert header == ("MODEL tiny  routing_version=7  autoscaling=on  tokens/s=375  requests/s=3.5  "
                      "p50=12.5ms  p99=250.0ms")


def test_host_lines_show_used_over_total_slots_with_a_bar() -> None:
    lines = render(_status([(1.0, 1)])).splitlines()
    assert lines[-3].split() == ["HOST", "NODE", "DEVICE", "SLOTS"]
    # 3 of 16 -> round(20 × 3/16) = round(3.75) = 4 cells filled; 8 of 8 -> all 20
    assert lines[-2] == f"{'tiny-host-0':<28} {'10.0.0.1':<16} {'cpu':<8} [####{'.' * 16}] 3/16"
    assert lines[-1] == f"{'tiny-host-1':<28} {'10.0.0.2':<16} {'cuda:0':<8} [{'#' * 20}] 8/8"


def test_a_layer_wider_than_the_screen_is_cut_with_the_count_left_out() -> None:
    layer3 = [(float(10 * (e + 1)), e % 3) for e in range(11)]  # 10 .. 110 tokens/s, hottest 200
    # (30 - 20) // 2 = 5 cells, raised to the minimum of 8; 11 - 8 = 3 left out
    narrow = render(_status(layer3), width=30)
    assert _row(narrow, 3) == "  L3    " + "...::--=" + "  " + "01201201" + " +3"
    wide = render(_status(layer3), width=120)  # 50 cells: the whole layer, no marker
    assert _row(wide, 3) == "  L3    " + "...::--===+" + "  " + "01201201201"  # "+" here is a shade
    assert _row(narrow, 1) == _row(wide, 1) == "  L1    " + " =@:" + "  " + "1230"  # short layers are whole


def test_a_host_with_no_slots_and_a_model_with_no_load_render_without_dividing_by_zero() -> None:
    status = pb.StatusResponse(
        models=[pb.ModelStatus(name="idle", layers=[pb.LayerStatus(layer=0, experts=[
            _expert(0, 0.0, 1), _expert(1, 0.0, 1)])])],
        hosts=[pb.HostStatus(id="h", slots_total=0, slots_used=0)])
    lines = render(status).splitlines()
    assert "autoscaling=off" in lines[0] and "tokens/s=0" in lines[0]
    assert _row("\n".join(lines), 0) == "  L0    " + "  " + "  " + "11"
    assert lines[-1].endswith(f"[{'.' * 20}] 0/0")
