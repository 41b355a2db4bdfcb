"""The benchmark's arithmetic: paired ratios, targets and the report (no timing here)."""

import pytest
from bench_loader import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_models")


def stats(round_medians, batch=16):
    times = [t for t in round_medians if t]
    return {"img_s": batch / sorted(times)[len(times) // 2], "round_medians_s": round_medians,
            "cpu_s_per_image": 0.01}


def test_ratios_are_paired_by_round(bench):
    # The machine runs at half speed from the middle of round 3 on: imvec's turn in that
    # round was slow, the peer's fast. The overall medians give 1.0 / 1.6 = 0.625; the
    # pairs give 1.25 in every round but that one.
    ours = stats([0.8, 0.8, 1.6, 1.6, 1.6])
    theirs = stats([1.0, 1.0, 1.0, 2.0, 2.0])
    pairs = bench.paired_ratios(ours, theirs)
    assert pairs == pytest.approx([1.25, 1.25, 0.625, 1.25, 1.25])
    assert sorted(pairs)[2] == pytest.approx(1.25)
    theirs_failed_once = stats([1.0, None, 1.0, 2.0, 2.0])
    assert len(bench.paired_ratios(ours, theirs_failed_once)) == 4
    # Results from before rounds were recorded: the ratio of the overall medians.
    assert bench.paired_ratios({"img_s": 30.0}, {"img_s": 20.0}) == [1.5]


def results(ours_rounds, keras_rounds, peak=100.0):
    runs = {"imvec": {"batches": {"16": stats(ours_rounds)}, "memory": {}},
            "keras": {"batches": {"16": stats(keras_rounds)}, "memory": {}}}
    return {"machine": {"cpu": "test", "cores": 2, "date": "today", "peak_gflops": peak,
                        "loadavg_start": 0.0, "loadavg_end": 0.0},
            "settings": {"batch_sizes": [16], "threads": 2, "rounds": len(ours_rounds),
                         "round_seconds": 1.5},
            "networks": {"nasnet_mobile": {"input_size": 224, "gflops_per_image": 1.0,
                                           "default_engine": "onnxruntime", "results": runs}}}


def test_targets_and_report(bench):
    data = results([0.125, 0.125, 0.25], [0.2, 0.1875, 0.375])  # 1.6x, 1.5x, 1.5x (exact)
    bench.analyse(data, data["machine"]["peak_gflops"])
    entry = data["networks"]["nasnet_mobile"]
    assert entry["ratios"]["16"]["keras"] == pytest.approx(1.5)
    assert entry["ratio_ranges"]["16"]["keras"] == pytest.approx([1.5, 1.6])
    assert entry["targets"]["vs_keras"]["met"]
    text = bench.markdown(data, "x.json", "x.png")
    assert "1.50× [1.50–1.60] met" in text
    slower = results([0.10, 0.10, 0.10], [0.14, 0.14, 0.14])
    bench.analyse(slower, 100.0)
    assert not slower["networks"]["nasnet_mobile"]["targets"]["vs_keras"]["met"]
    assert "**not met**" in bench.markdown(slower, "x.json", "x.png")


def test_bfloat16_contestants_are_compared_apart(bench):
    data = results([0.125, 0.125, 0.125], [0.25, 0.25, 0.25])  # imvec fp32 2x keras fp32
    runs = data["networks"]["nasnet_mobile"]["results"]
    runs["keras-bf16"] = {"batches": {"16": stats([0.1, 0.1, 0.1])}, "memory": {}}
    runs["imvec-bf16"] = {"batches": {"16": stats([0.05, 0.05, 0.05])}, "memory": {}}
    bench.analyse(data, 100.0, peak_bf16=200.0)
    entry = data["networks"]["nasnet_mobile"]
    # keras-bf16 is faster than imvec's float32 default, but it is not a float32 peer
    assert entry["targets"]["ahead_of_best_peer"]["peer"] == "keras"
    assert entry["targets"]["ahead_of_best_peer"]["ratio"] == pytest.approx(2.0)
    bf16 = entry["bf16"]
    assert bf16["best_bf16_peer"] == "keras-bf16"
    assert bf16["ratios"]["keras-bf16"]["ratio"] == pytest.approx(2.0)
    assert bf16["ratios"]["imvec"]["ratio"] == pytest.approx(2.5)
    assert bf16["ratios"]["keras"]["ratio"] == pytest.approx(5.0)
    # against its own peak: 320 img/s x 1 GFLOP over 200 GFLOP/s
    assert runs["imvec-bf16"]["batches"]["16"]["peak_fraction"] == pytest.approx(1.6)
    text = bench.markdown(data, "x.json", "x.png")
    assert "| nasnet_mobile | 16 | 320.00 | 160 | 2.00× [2.00–2.00] (keras-bf16) | 2.50×" in text
