"""bench_ray_nodes' arithmetic: the steady rate from the shards' done times and the round
the report singles out (no cluster, no timing here)."""

import pytest
from bench_loader import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_ray_nodes")


def test_steady_rate_leaves_out_the_first_shard_in_time_order(bench):
    # done at 10, 11, 12, 14 s (given out of order): 100 + 100 + 50 images in 4 s
    assert bench.steady_rate([10.0, 12.0, 11.0, 14.0], [100, 100, 100, 50]) == 62.5


def test_steady_rate_of_one_shard_is_unknown(bench):
    assert bench.steady_rate([10.0], [100]) == 0.0
    assert bench.steady_rate([10.0, 10.0], [100, 100]) == 0.0


def run(rnd, nodes, others, steady, rate, first=8.0):
    return {"round": rnd, "nodes": nodes, "others_cores": others, "first_shard_s": first,
            "steady_images_per_s": steady, "images_per_s": rate}


def test_the_report_singles_out_the_least_disturbed_two_node_run(bench):
    runs = [run(0, 1, 0.1, 40.0, 35.0), run(0, 2, 0.9, 50.0, 40.0),
            run(1, 1, 0.9, 40.0, 35.0), run(1, 2, 0.2, 78.0, 56.0, first=7.5)]
    sentence = bench._quietest(runs)
    assert sentence.startswith("Least disturbed 2-node run (round 1, others' CPU 0.2 cores)")
    assert "1.95x the 1-node steady rate, 1.60x end to end" in sentence
    assert "8.0 s to the first shard with 1 node, 7.5 s with 2" in sentence
