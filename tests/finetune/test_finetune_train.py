"""Fine-tuning runs end to end: learning, files, resumption, the run directory's guards."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import imvec
from imvec.cli import main
from imvec.finetune import FinetuneConfig, finetune, make_toy_dataset, predict
from imvec.finetune.data import read_dataset, stratified_split


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """3 colour classes x 12 images."""
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), per_class=12, size=64, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """3 classes x 6 images, for runs whose numbers, not their quality, matter."""
    return make_toy_dataset(tmp_path_factory.mktemp("tiny"), per_class=6, size=40, seed=4)


@pytest.fixture(scope="module")
def head_run(toy, converted, tmp_path_factory):
    """A head trained on the NASNet-A mobile fixture (3 cells, TF-exported weights)."""
    config = FinetuneConfig(str(toy), str(converted("nasnet_mobile_small")),
                            str(tmp_path_factory.mktemp("runs") / "head"), epochs=10,
                            batch_size=8, lr=0.02, val_fraction=0.3, workers=0)
    return config, finetune(config)


def test_a_head_learns_the_toy_classes(head_run):
    config, result = head_run
    history = result.history
    assert [row["epoch"] for row in history] == list(range(1, 11))
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["val_accuracy"] >= 0.75  # chance is 1/3
    assert history[-1]["lr"] == pytest.approx(0.0)  # cosine to zero


def test_run_directory_holds_metrics_plot_and_a_loadable_classifier(head_run, toy):
    config, result = head_run
    run = result.run_dir
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and float(rows[-1]["val_accuracy"]) == result.history[-1][
        "val_accuracy"]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["classes"] == ["blue", "green", "red"] and len(summary["epochs"]) == 10
    assert (run / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    module = imvec.load(run / "model.safetensors")
    assert module.card.variant == "classification" and module.card.num_classes == 3
    assert module.class_names == ["blue", "green", "red"]
    assert module.get_output_info_dict()["default"].get_shape() == (None, 3)
    # the saved classifier reproduces the trained head's validation accuracy
    _, val = stratified_split(read_dataset(toy), config.val_fraction, config.seed)
    predictions = predict(val.paths, run, k=1)
    truth = [val.class_names[label] for label in val.labels]
    accuracy = np.mean([p.labels[0][0] == t for p, t in zip(predictions, truth, strict=True)])
    assert accuracy == pytest.approx(result.history[-1]["val_accuracy"])


def test_predict_command_prints_top_k(head_run, toy, capsys):
    _, result = head_run
    image = sorted((toy / "red").iterdir())[0]
    assert main(["predict", str(image), "--model", str(result.run_dir), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    probabilities = [float(line.split()[0]) for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0
    bad = toy.parent / "broken.png"
    bad.write_bytes(b"nope")
    assert main(["predict", str(bad), str(image), "-m", str(result.run_dir), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["path"] == str(image) and "broken.png" in err
    assert "1 of 2 images could not be read" in err


def test_predict_refuses_feature_vector_models(converted, toy, capsys):
    image = str(sorted((toy / "red").iterdir())[0])
    assert main(["predict", image, "-m", str(converted("mobilenet_v1_025_128"))]) == 1
    assert "feature-vector" in capsys.readouterr().err
    assert main(["predict", image, "-m", "google/imagenet/nasnet_mobile/feature_vector/3"]) == 1
    assert "needs google/imagenet/nasnet_mobile/classification/3" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["head", "full"])
def test_resumed_run_equals_uninterrupted_run(mode, tiny, converted, tmp_path):
    def config(name, **kw):
        return FinetuneConfig(str(tiny), str(converted("mobilenet_v1_025_128")),
                              str(tmp_path / name), mode=mode, epochs=2, batch_size=4,
                              image_size=32, dropout=0.3, augment_views=2 if mode == "head"
                              else 1, val_fraction=0.2, workers=0, **kw)

    straight = finetune(config("straight"))

    def crash(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(config("resumed"), on_epoch_end=crash)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = finetune(config("resumed", resume=True))

    def drop_time(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert drop_time(resumed.history) == drop_time(straight.history)
    a, b = load_file(straight.model_path), load_file(resumed.model_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["Logits.Conv2d_1c_1x1.weight"],
                           torch.zeros_like(a["Logits.Conv2d_1c_1x1.weight"]))


def test_run_directory_is_never_overwritten(tiny, converted, tmp_path):
    config = FinetuneConfig(str(tiny), str(converted("mobilenet_v1_025_128")),
                            str(tmp_path / "run"), epochs=1, image_size=32, workers=0)
    finetune(config)
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        finetune(config)
    changed = FinetuneConfig(**{**config.to_dict(), "lr": 0.5, "resume": True})
    with pytest.raises(ValueError, match=r"other options.*lr: run has 0.001, now 0.5"):
        finetune(changed)
    done = finetune(FinetuneConfig(**{**config.to_dict(), "resume": True}))  # already complete
    assert len(done.history) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no imvec run"):
        finetune(FinetuneConfig(**{**config.to_dict(), "output": str(tmp_path / "other")}))
    with pytest.raises(ValueError, match="takes 224x224 images only"):
        finetune(FinetuneConfig(str(tiny), str(converted("nasnet_mobile_small")),
                                str(tmp_path / "nas"), image_size=96, workers=0))


def test_table_dataset_with_a_broken_image_is_reported_not_fatal(tiny, converted, tmp_path):
    images = read_dataset(tiny)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    table = tmp_path / "data.csv"
    rows = [(p, images.class_names[y]) for p, y in zip(images.paths, images.labels,
                                                       strict=True)]
    rows.insert(1, (str(broken), "red"))
    table.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    result = finetune(FinetuneConfig(str(table), str(converted("mobilenet_v1_025_128")),
                                     str(tmp_path / "run"), epochs=1, image_size=32,
                                     val_fraction=0.0, workers=0))
    assert (result.run_dir / "skipped_images.txt").read_text().split() == [str(broken)]
    assert json.loads((result.run_dir / "metrics.json").read_text())["skipped_images"] == 1


def test_finetune_command(tiny, converted, tmp_path, capsys):
    args = ["finetune", str(tiny), "--model", str(converted("mobilenet_v1_025_128")), "-o",
            str(tmp_path / "run"), "--epochs", "1", "--size", "32", "--workers", "0",
            "--mode", "full", "--batch-size", "6", "--lr", "0.01"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 classes, 1 epoch," in out and "model.safetensors" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["mode"] == "full" and config["optimizer"] == "sgd" and config["epochs"] == 1
    assert main(args) == 1
    assert "--resume" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "nowhere"), "-m", "nasnet_mobile", "-o",
                 str(tmp_path / "x")]) == 1
    assert "no such dataset" in capsys.readouterr().err


def _tiny_head_config(tiny, converted, output, **kw):
    """Head mode with dropout, so that the masks decide the weights."""
    return FinetuneConfig(str(tiny), str(converted("mobilenet_v1_025_128")), str(output),
                          epochs=2, batch_size=4, image_size=32, dropout=0.5,
                          augment_views=2, val_fraction=0.2, workers=0, **kw)


def _assert_same_weights(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_head_weights_do_not_depend_on_a_warm_cache(tiny, converted, tmp_path):
    """The caching pass (and the engine's first build) draw from the global RNG only when
    the cache is cold; dropout masks must not see the difference."""
    cold = finetune(_tiny_head_config(tiny, converted, tmp_path / "cold"))
    shutil.copytree(tmp_path / "cold" / "cache", tmp_path / "warm" / "cache")
    warm = finetune(_tiny_head_config(tiny, converted, tmp_path / "warm"))
    _assert_same_weights(cold.model_path, warm.model_path)
    torch.manual_seed(123)  # what the caller does with the global RNG does not matter either
    torch.rand(7)
    again = finetune(_tiny_head_config(tiny, converted, tmp_path / "again"))
    _assert_same_weights(cold.model_path, again.model_path)


def test_a_run_killed_before_its_first_checkpoint_reruns_to_the_same_weights(
        tiny, converted, tmp_path, monkeypatch):
    straight = finetune(_tiny_head_config(tiny, converted, tmp_path / "straight"))
    import imvec.finetune.train as train

    real_save = train.save_checkpoint

    def killed(path, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune(_tiny_head_config(tiny, converted, tmp_path / "killed"))
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    rerun = finetune(_tiny_head_config(tiny, converted, tmp_path / "killed"))  # the same call
    _assert_same_weights(straight.model_path, rerun.model_path)


def test_a_failed_start_does_not_block_the_same_command(tiny, converted, tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    args = ["finetune", str(tiny), "-m", str(model), "-o", str(tmp_path / "run"), "--epochs",
            "1", "--size", "32", "--workers", "0"]
    assert main(args) == 1  # the weights are not there yet
    assert "no such weights file" in capsys.readouterr().err
    shutil.copy(converted("mobilenet_v1_025_128"), model)
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_damaged_checkpoint_says_what_to_do(tiny, converted, tmp_path, capsys):
    config = _tiny_head_config(tiny, converted, tmp_path / "run", resume=True)
    finetune(config)
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"\0" * 100)
    with pytest.raises(imvec.CheckpointError, match=r"checkpoint.pt is damaged.*delete it"):
        finetune(config)
    args = ["finetune", str(tiny), "-m", str(converted("mobilenet_v1_025_128")), "-o",
            str(tmp_path / "run"), "--epochs", "2", "--batch-size", "4", "--size", "32",
            "--dropout", "0.5", "--augment-views", "2", "--val-fraction", "0.2", "--workers",
            "0", "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged" in err[0] and "delete it" in err[0]
    (tmp_path / "run" / "checkpoint.pt").unlink()  # the fix the message gives
    assert main(args) == 0


@pytest.mark.parametrize("options,match", [
    (dict(batch_norm_momentum=float("nan")), "batch_norm_momentum must be a TF decay"),
    (dict(mode="full", batch_norm_momentum=1.5), "batch_norm_momentum must be a TF decay"),
    (dict(batch_norm_momentum=0.99), "batch_norm_momentum applies to --mode full"),
    (dict(drop_path_keep_prob=0.7), "drop_path_keep_prob applies to --mode full"),
    (dict(lr=float("nan")), "lr must be positive"),
])
def test_options_that_would_be_ignored_or_break_training_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        FinetuneConfig("data", "nasnet_mobile", "out", **options).resolved()


def test_old_precision_names_still_work():
    config = FinetuneConfig("data", "nasnet_mobile", "out", precision="bf16").resolved()
    assert config.precision == "bfloat16"


def test_training_rng_is_apart_from_the_global_one():
    from imvec.finetune.state import TrainingRNG

    rng = TrainingRNG(5, torch.device("cpu"))
    torch.manual_seed(0)
    expected_outside = torch.rand(3)
    torch.manual_seed(0)
    with rng.active():
        first = torch.rand(4)
    assert torch.equal(torch.rand(3), expected_outside)  # the global stream did not move
    torch.rand(100)  # draws outside do not move the training stream either
    with rng.active():
        second = torch.rand(4)
    reference = torch.rand(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([first, second]), reference)
    restored = TrainingRNG(99, torch.device("cpu"))
    restored.load_state_dict(rng.state_dict())
    with rng.active():
        a = torch.rand(5)
    with restored.active():
        b = torch.rand(5)
    assert torch.equal(a, b)
