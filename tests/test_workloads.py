"""Workloads: the standard-library corpus, the tiny GPT, the data streams, the classifiers and user data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwise.problems.corpus import is_validation_file, stdlib_corpus, stdlib_source_files, unigram_cross_entropy
from gradwise.problems.data import RandomWindows, ShuffledEpochs
from gradwise.problems.tiny_gpt import TinyGPT, next_byte_loss
from gradwise.problems.workloads import WORKLOADS, make_workload
from gradwise.train import TrainConfig, train


def test_source_files_exclude_tests_and_installed_packages_and_are_sorted(tmp_path):
    for name in ("b.py", "a/x.py", "test/t.py", "a/tests/u.py", "idlelib/idle_test/v.py", "test_w.py",
                 "site-packages/pkg/y.py", "a/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("pass\n")
    assert [path.relative_to(tmp_path).as_posix() for path in stdlib_source_files(tmp_path)] == ["a/x.py", "b.py"]


def test_the_split_depends_on_the_file_name_only(tmp_path):
    names = [f"m{i}.py" for i in range(60)]
    for name in names:
        (tmp_path / name).write_text(f"# {name}\n")
    corpus = stdlib_corpus(str(tmp_path))
    expected_validation = sum(len(f"# {name}\n") + 2 for name in names if is_validation_file(name)) - 2
    assert corpus.validation.numel() == expected_validation
    assert 0 < corpus.validation.numel() < corpus.train.numel()


def test_unigram_cross_entropy_is_the_smoothed_formula():
    train_bytes = torch.tensor([0, 0, 0, 1], dtype=torch.uint8)
    evaluation = torch.tensor([0, 1, 2], dtype=torch.uint8)
    total = 4 + 256
    expected = -(math.log(4 / total) + math.log(2 / total) + math.log(1 / total)) / 3
    assert unigram_cross_entropy(train_bytes, evaluation) == pytest.approx(expected, rel=1e-12)


def test_the_stdlib_corpus_is_megabytes_of_python_with_a_baseline_near_its_entropy():
    corpus = stdlib_corpus()
    assert corpus.train.numel() > 5_000_000 and corpus.validation.numel() > 500_000
    counts = torch.bincount(corpus.validation.long(), minlength=256).double()
    frequencies = counts[counts > 0] / counts.sum()
    entropy = float(-(frequencies * frequencies.log()).sum())
    baseline = corpus.unigram_baseline()
    assert 3.0 < entropy <= baseline < entropy + 0.1  # cross-entropy >= entropy, train and val alike
    assert b"def " in bytes(corpus.train[:100_000].tolist())


def test_tiny_gpt_has_1_to_5_million_parameters_and_starts_at_log_256():
    model = TinyGPT()
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 5_000_000
    tokens = torch.randint(0, 256, (4, 129))
    with torch.no_grad():
        loss = next_byte_loss(model, (tokens[:, :-1], tokens[:, 1:]))
    assert loss.item() == pytest.approx(math.log(256), abs=0.3)


def test_tiny_gpt_is_causal():
    model = TinyGPT(seq_len=16, d_model=32, n_layer=2, n_head=2).eval()
    tokens = torch.randint(0, 256, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_random_windows_are_next_byte_pairs_and_resume_exactly():
    text = torch.arange(200, dtype=torch.uint8)
    stream = RandomWindows(text, batch_size=3, seq_len=8, seed=5)
    inputs, targets = stream.next_batch()
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and torch.equal(targets[:, 0], inputs[:, 0] + 1)
    state = stream.state_dict()
    expected = [stream.next_batch() for _ in range(3)]
    again = RandomWindows(text, batch_size=3, seq_len=8, seed=5)
    again.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, [again.next_batch() for _ in range(3)]))


def test_shuffled_epochs_visit_every_example_once_per_epoch_and_batches_concatenate():
    inputs = torch.arange(10).float()[:, None]
    targets = torch.arange(10)
    small = ShuffledEpochs(inputs, targets, batch_size=3, seed=2)
    seen = torch.cat([small.next_batch()[1] for _ in range(10)])  # 30 examples: three epochs
    for epoch in range(3):
        assert sorted(seen[10 * epoch : 10 * epoch + 10].tolist()) == list(range(10))
    big = ShuffledEpochs(inputs, targets, batch_size=6, seed=2)
    assert torch.equal(torch.cat([big.next_batch()[1] for _ in range(5)]), seen)


def test_mlp_and_logreg_reach_their_targets():
    for name, steps in (("mlp", 600), ("logreg", 300)):
        result = train(TrainConfig(workload=name, steps=steps, threads=1))
        assert result.target_reached, (name, result.final_metrics, result.target)
        assert result.final_metrics["val_accuracy"] > result.target.baseline + 0.3


def test_user_text_file_trains_a_byte_model(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    options = dict(seq_len=32, d_model=32, n_layer=1, n_head=2, eval_windows=8)
    result = train(TrainConfig(workload="text", data=[str(path)], workload_options=options, steps=60, batch_size=8,
                               lr=1e-2, threads=1, precision="fp32"))
    assert result.final_metrics["val_loss"] < 0.5 * result.target.baseline and result.target_reached


def test_user_npy_pair_trains_a_classifier_and_bad_arrays_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(600, 5)).astype(np.float32)
    labels = (inputs[:, 0] + inputs[:, 1] > 0).astype(np.int64)
    np.save(tmp_path / "X.npy", inputs)
    np.save(tmp_path / "y.npy", labels)
    data = [str(tmp_path / "X.npy"), str(tmp_path / "y.npy")]
    result = train(TrainConfig(workload="npy", data=data, steps=150, batch_size=32, threads=1))
    assert result.final_metrics["val_accuracy"] > 0.9
    np.save(tmp_path / "y.npy", labels[:-1])
    with pytest.raises(ValueError, match="inputs have 600 rows but labels 599"):
        make_workload("npy", 8, data=data)
    np.save(tmp_path / "y.npy", labels.astype(np.float32))
    with pytest.raises(ValueError, match="labels must be a vector of integers"):
        make_workload("npy", 8, data=data)


def test_workload_registry_refuses_unknown_options_and_misplaced_data():
    assert set(WORKLOADS) == {"tiny-gpt", "mlp", "logreg", "text", "npy"}
    with pytest.raises(ValueError, match="unexpected keyword argument 'width'"):
        make_workload("mlp", 8, width=3)
    with pytest.raises(ValueError, match="generates its own data"):
        make_workload("mlp", 8, data=["x.npy"])
    with pytest.raises(ValueError, match="needs data"):
        make_workload("text", 8)
