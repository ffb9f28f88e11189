"""Batch access (inputs, labels, the batch size) without a Trainer: default rules, label checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actpat.recorder.batches import BatchReader, batch_size, default_inputs, default_labels


def _reader(**kwargs):
    notes = []
    return BatchReader(kwargs.get("inputs_from"), kwargs.get("labels_from"), lambda key, msg: notes.append(key)), notes


@pytest.mark.parametrize("key", ["y", "label", "labels", "target", "targets"])
def test_default_label_keys(key):
    labels, source = default_labels({"pixels": torch.zeros(2), key: torch.tensor([1, 2])})
    assert labels.tolist() == [1, 2] and source == f"batch[{key!r}]"


def test_default_inputs_of_a_dict_without_an_input_key_names_the_options():
    with pytest.raises(ValueError, match=r"keys \['meta', 'pixels'\].*inputs_from=.*probe_forward="):
        default_inputs({"pixels": torch.zeros(2), "meta": 1})


def test_batch_size_is_the_first_tensor_with_a_batch_dimension():
    assert batch_size({"step": torch.tensor(3), "names": ["a", "b"], "x": (torch.zeros(5, 2),)}) == 5
    with pytest.raises(ValueError, match="inputs_from"):
        batch_size({"names": ["a", "b"]})


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([2, 0, 1]), np.array([2, 0, 1], dtype=np.int16), [2, 0, 1], torch.tensor([True, False, True])],
    ids=["tensor", "numpy", "list", "bool"],
)
def test_integer_labels_pass_unchanged(labels):
    reader, notes = _reader(labels_from=lambda batch: labels)
    got = reader.labels(None, 3)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(labels))
    assert notes == []


@pytest.mark.parametrize("as_numpy", [False, True])
def test_one_hot_labels_become_class_indices_and_are_noted_once(as_numpy):
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0, 1]), 4).float()
    one_hot = one_hot.numpy() if as_numpy else one_hot
    reader, notes = _reader(labels_from=lambda batch: one_hot)
    for _ in range(2):
        assert np.asarray(reader.labels(None, 3)).tolist() == [2, 0, 1]
    assert notes == ["one-hot", "one-hot"]  # the callback's warn-once keeps it to one message


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0.0, 1.0, 1.0]), r"float labels \(torch.float32\) of shape \(3,\)"),
        (np.array([0.5, 0.2, 0.1]), r"float labels \(float64\) of shape \(3,\)"),
        (torch.full((3, 4), 0.25), r"shape \(3,\) or one-hot \(3, K\), but got shape \(3, 4\) .*rows are not one-hot"),
        (torch.tensor([[2], [0], [1]]), r"but got shape \(3, 1\)"),
        (torch.tensor([1, 2]), r"3 for this batch, but got labels of shape \(2,\)"),
        (torch.tensor(1), r"but got shape \(\)"),
        (["cat", "dog", "cat"], r"dtype <U3"),
    ],
    ids=["float", "numpy-float", "soft", "column", "length", "scalar", "strings"],
)
def test_wrong_labels_are_an_error_naming_the_shape_and_the_fix(labels, message):
    reader, _ = _reader(labels_from=lambda batch: labels)
    with pytest.raises(ValueError, match=message) as error:
        reader.labels(None, 3)
    assert "labels_from" in str(error.value)


def test_default_labels_name_their_source_in_errors():
    reader, _ = _reader()
    with pytest.raises(ValueError, match=r"from batch\[1\]"):
        reader.labels([torch.zeros(3, 2), torch.zeros(3)], 3)
    assert reader.labels({"x": torch.zeros(3)}, 3) is None
