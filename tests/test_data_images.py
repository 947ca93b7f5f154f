"""Image question answering data: hand-checked answers, the renderer, the held-out split, the loss
targets, determinism, config-only shapes and the 3-tuple batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter, ValidationError

from bench.data import DataConfig, load_dataset
from bench.data import images as I
from bench.data.images import VOCAB, ImagesConfig, decode, encode

DATA = TypeAdapter(DataConfig)
SMALL = {"n_train": 400, "n_val": 120}


def config(**settings) -> ImagesConfig:
    """A config through the DataConfig union, as a run file would give it."""
    return DATA.validate_python({"source": "images", **SMALL, **settings})


def qtype_of(question: list[str]) -> str:
    """A question's type from its words (the templates in bench/data/images.py)."""
    if question == ["caption"]:
        return "caption"
    if question[:2] in (["which", "digit"], ["what", "shape"]):
        return "position"
    if question[:2] == ["what", "colour"]:
        return "colour"
    if question[:2] == ["how", "many"]:
        return "count"
    if question[:3] == ["is", "there", "a"]:
        return "exists"
    if question[0] == "is" and question[2:] == ["sum", "larger"]:
        return "compare"
    raise AssertionError(f"unrecognised question {question}")


def split_row(tokens: np.ndarray) -> tuple[list[str], list[str]]:
    """(question words, answer words) of one full ``<bos> q ? a <eos> <pad>…`` token row."""
    words = decode(tokens).split()
    assert words[0] == "<bos>"
    mark, end = words.index("?"), words.index("<eos>")
    return words[1:mark], words[mark + 1 : end]


def full_rows(dataset, part: str = "train") -> np.ndarray:
    """The unshifted sequences: inputs plus the one token the last position predicts."""
    inputs, _ = dataset.train if part == "train" else dataset.test
    tail = np.full((len(inputs), 1), I.PAD)
    rows = np.concatenate([inputs, tail], axis=1)
    targets = (dataset.train if part == "train" else dataset.test)[1]
    last = targets[:, -1] >= 0  # an answer that fills the row: its final <eos> lives only in the targets
    rows[last, -1] = targets[last, -1]
    return rows


# -- hand-checked answers ------------------------------------------------------------------------


def test_a_hand_checked_digits_scene():
    labels = [[3, 7], [1, 0]]
    assert I.digits_answer(labels, "which digit is top left ?") == "3"
    assert I.digits_answer(labels, "which digit is bottom right ?") == "0"
    assert I.digits_answer(labels, "how many 7 ?") == "1"
    assert I.digits_answer(labels, "how many 5 ?") == "0"
    assert I.digits_answer(labels, "is left sum larger ?") == "no"  # 3 + 1 = 4 vs 7 + 0 = 7
    assert I.digits_answer(labels, "is right sum larger ?") == "yes"
    assert I.digits_answer(labels, "caption ?") == "3 7 1 0"
    assert I.digits_answer([[4]], "which digit ?") == "4"  # grid 1: no position words


def test_an_odd_grid_compares_halves_without_the_middle_column():
    labels = [[1, 9, 2], [1, 9, 2], [1, 9, 2]]  # the middle column's 27 on either side would decide it
    assert I.digits_answer(labels, "is left sum larger ?") == "no"  # 3 vs 6
    assert I.digits_answer(labels, "is right sum larger ?") == "yes"
    assert I.digits_answer(labels, "which digit is middle center ?") == "9"
    assert I.digits_answer(labels, "how many 9 ?") == "3"


def test_a_hand_checked_shapes_scene():
    cells = [["red circle", "empty"], ["blue square", "green triangle"]]
    assert I.shapes_answer(cells, "what shape is top left ?") == "circle"
    assert I.shapes_answer(cells, "what shape is top right ?") == "empty"
    assert I.shapes_answer(cells, "what colour is bottom left ?") == "blue"
    assert I.shapes_answer(cells, "how many red ?") == "1"
    assert I.shapes_answer(cells, "how many circle ?") == "1"
    assert I.shapes_answer(cells, "how many yellow ?") == "0"
    assert I.shapes_answer(cells, "is there a blue square ?") == "yes"
    assert I.shapes_answer(cells, "is there a red square ?") == "no"
    assert I.shapes_answer(cells, "caption ?") == "red circle , empty , blue square , green triangle"
    with pytest.raises(ValueError, match="empty cell has no colour"):
        I.shapes_answer(cells, "what colour is top right ?")


def test_the_renderer_puts_each_shape_in_its_cell_in_its_colour():
    cells = [["red circle", "empty"], ["blue square", "green triangle"]]
    image = I.render_shapes(cells, cell=8)
    assert image.shape == (3, 16, 16) and image.dtype == np.uint8
    blocks = {(r, c): image[:, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8] for r in range(2) for c in range(2)}
    expected = {(0, 0): ("red", "circle"), (1, 0): ("blue", "square"), (1, 1): ("green", "triangle")}
    assert not blocks[0, 1].any()  # the empty cell is black
    for where, (colour, shape) in expected.items():
        block = blocks[where]
        lit = block.any(axis=0)
        assert (block[:, lit].T == I.RGB[colour]).all()  # every lit pixel is exactly the cell's colour
        assert np.array_equal(lit, I.shape_mask(shape, 8))
        assert not lit[0].any() and not lit[-1].any() and not lit[:, 0].any() and not lit[:, -1].any()  # margin


@pytest.mark.parametrize("cell", [6, 8, 12, 16])
def test_the_three_shapes_differ_in_pixel_count(cell):
    counts = {shape: int(I.shape_mask(shape, cell).sum()) for shape in I.SHAPES}
    assert len(set(counts.values())) == 3 and min(counts.values()) > 0, counts


# -- the split -----------------------------------------------------------------------------------


def _cell_blocks(images: np.ndarray, grid: int, cell: int) -> set[bytes]:
    n, channels = images.shape[:2]
    blocks = images.reshape(n, channels, grid, cell, grid, cell).transpose(0, 2, 4, 1, 3, 5)
    return {b.tobytes() for b in blocks.reshape(-1, channels, cell, cell)}


@pytest.mark.parametrize("grid", [2, 3])
def test_no_validation_digit_image_appears_in_training(grid):
    settings = config(grid=grid, n_train=1500, n_val=300)
    dataset = load_dataset(settings)
    train, val = _cell_blocks(dataset.train_images, grid, 8), _cell_blocks(dataset.test_images, grid, 8)
    assert len(val) > 100 and not train & val  # no pixel block of a validation cell in any training scene
    assert not set(dataset.train_scenes.ravel()) & set(dataset.test_scenes.ravel())
    train_pool, val_pool = I.digits_split(1797, settings.val_sources, settings.seed)
    assert set(dataset.test_scenes.ravel()) <= set(val_pool) and len(val_pool) == round(0.2 * 1797)


def test_no_validation_shapes_scene_appears_in_training():
    dataset = load_dataset(config(scene="shapes", n_train=4000, n_val=500))  # ~14% would collide undrawn
    seen = {scene.tobytes() for scene in dataset.train_scenes}
    assert not any(scene.tobytes() in seen for scene in dataset.test_scenes)
    train_images = {image.tobytes() for image in dataset.train_images}
    assert not any(image.tobytes() in train_images for image in dataset.test_images)


# -- sequences and targets -----------------------------------------------------------------------


@pytest.mark.parametrize("settings", [{}, {"grid": 3}, {"grid": 1}, {"scene": "shapes"},
                                      {"scene": "shapes", "grid": 4, "cell": 6}, {"format": "caption"}])
def test_targets_are_exactly_the_answer_tokens_and_the_final_eos(settings):
    settings = config(**settings)
    dataset = load_dataset(settings)
    _, labels = I.digits_source()
    for part in ("train", "test"):
        inputs, targets = dataset.train if part == "train" else dataset.test
        scenes = dataset.train_scenes if part == "train" else dataset.test_scenes
        assert inputs.shape == targets.shape == (len(scenes), settings.seq_len)
        for row, x, y, scene in zip(full_rows(dataset, part), inputs, targets, scenes):
            question, answer = split_row(row)
            mark = len(question) + 1  # the "?" position predicts the first answer word
            labelled = np.nonzero(y >= 0)[0]
            assert labelled.tolist() == list(range(mark, mark + len(answer) + 1))
            assert y[labelled[-1]] == I.EOS and decode(y[labelled[:-1]]) == " ".join(answer)
            assert (x[labelled] == row[labelled]).all() and (y[labelled] == row[labelled + 1]).all()
            assert not (y[x == I.PAD] >= 0).any()  # padding is never scored
            truth = (I.digits_answer(labels[scene], question) if settings.scene == "digits"
                     else I.shapes_answer(scene, question))
            assert " ".join(answer) == truth  # the answer follows from the scene's source labels


def test_vocabulary_round_trips_and_refuses_unknown_words():
    assert VOCAB[0] == "<pad>" and len(set(VOCAB)) == len(VOCAB)
    assert decode(encode("which digit is top left ? 3")) == "which digit is top left ? 3"
    with pytest.raises(ValueError, match="purple"):
        encode(["purple"])
    with pytest.raises(ValueError, match="outside"):
        decode([-1])


def test_sequence_lengths_are_the_longest_question_and_every_row_fits():
    assert config().seq_len == 8  # <bos> which digit is top left ? 3 <eos>, less one for the shift
    assert config(scene="shapes").seq_len == 14  # <bos> caption ? four cells, three commas <eos>
    for settings in ({}, {"scene": "shapes"}, {"grid": 4}):
        settings = config(**settings)
        targets = load_dataset(settings).train[1]
        assert (targets[:, -1] >= 0).any()  # some answer reaches the last position: no slack


def test_question_types_are_balanced_and_answers_are_not_degenerate():
    digits, shapes = load_dataset(config(n_train=2000)), load_dataset(config(scene="shapes", n_train=2000))
    for dataset in (digits, shapes):
        counts = np.bincount(dataset.train_types, minlength=len(dataset.question_types))
        assert counts.max() - counts.min() <= 1
    answers = {name: {} for name in ("digits", "shapes")}
    for name, dataset in (("digits", digits), ("shapes", shapes)):
        for row in full_rows(dataset):
            question, answer = split_row(row)
            answers[name].setdefault(qtype_of(question), []).append(" ".join(answer))
    share = lambda values, value: np.mean([v == value for v in values])  # noqa: E731
    assert 0.35 < share(answers["digits"]["compare"], "yes") < 0.65
    assert 0.3 < 1 - share(answers["digits"]["count"], "0") < 0.7  # the digit is present about half the time
    assert 0.4 < share(answers["shapes"]["exists"], "yes") < 0.6
    assert 0.3 < 1 - share(answers["shapes"]["count"], "0") < 0.7
    assert "empty" not in answers["shapes"]["colour"] and "empty" in answers["shapes"]["position"]


# -- determinism, config-only facts ----------------------------------------------------------------


@pytest.mark.parametrize("scene", ["digits", "shapes"])
def test_generation_is_deterministic_given_the_config(scene):
    build = I._images.__wrapped__  # bypass the per-process cache: generate twice
    a, b = build(config(scene=scene)), build(config(scene=scene))
    for name in ("train_images", "test_images", "train_scenes", "test_scenes"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert all(np.array_equal(x, y) for x, y in zip((*a.train, *a.test), (*b.train, *b.test)))
    assert a.fingerprint == b.fingerprint
    other = build(config(scene=scene, seed=1))
    assert not np.array_equal(a.train_images, other.train_images)
    assert a.fingerprint["sha256"] != other.fingerprint["sha256"]


SHAPES_OF_SETTINGS = [{}, {"grid": 1}, {"grid": 3, "cell": 16}, {"grid": 4, "questions": ["count", "caption"]},
                      {"scene": "shapes"}, {"scene": "shapes", "grid": 3, "cell": 6},
                      {"scene": "shapes", "format": "caption"}]


def test_config_knows_vocabulary_image_shape_and_seq_len_without_loading(monkeypatch):
    import sklearn.datasets

    def offline():
        raise AssertionError("load_digits called")

    monkeypatch.setattr(sklearn.datasets, "load_digits", offline)
    with pytest.raises(AssertionError, match="load_digits called"):
        I.digits_source.__wrapped__()  # the patch is in force
    known = [(c.known_vocab_size(), c.image_shape(), c.seq_len, c.question_types())
             for c in map(lambda s: config(**s), SHAPES_OF_SETTINGS)]
    monkeypatch.undo()
    assert known[0][:2] == (len(VOCAB), (1, 16, 16)) and known[4][1] == (3, 16, 16)
    for settings, (vocab, shape, seq_len, types) in zip(SHAPES_OF_SETTINGS, known):
        dataset = load_dataset(config(**settings))
        assert (dataset.vocab_size, dataset.image_shape, dataset.seq_len, dataset.question_types) == (
            vocab, shape, seq_len, types)
        assert dataset.train_images.shape[1:] == shape and dataset.kind == "image"


# -- batches -------------------------------------------------------------------------------------


def test_batches_are_three_tuples_of_tokens_targets_and_images():
    settings = config(scene="shapes")
    dataset = load_dataset(settings)
    T, (C, H, W) = settings.seq_len, settings.image_shape()
    x, y, images = dataset.train_batch(0, 0, 5, T)
    assert x.shape == y.shape == (5, T) and x.dtype == y.dtype == torch.int64
    assert images.shape == (5, C, H, W) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.max() == 1
    calibration = dataset.calibration_batch(0, 3, T)
    assert isinstance(calibration, torch.Tensor) and calibration.shape == (3, T)
    with pytest.raises(ValueError, match=str(T)):
        dataset.train_batch(0, 0, 5, T + 1)
    val = dataset.val_batches(50, T, 16)
    assert [len(b[0]) for b in val] == [16, 16, 16, 2] and all(len(b) == 3 for b in val)
    assert sum(len(b[0]) for b in dataset.val_batches(None, T, 64)) == SMALL["n_val"]


def test_an_epoch_sees_every_training_example_once_and_images_stay_with_their_text():
    dataset = load_dataset(config(n_train=60))
    T = dataset.seq_len
    key = lambda x, image: x.numpy().tobytes() + (image * 255).round().byte().numpy().tobytes()  # noqa: E731
    index = {key(torch.from_numpy(x), torch.from_numpy(im).float() / 255): i
             for i, (x, im) in enumerate(zip(dataset.train[0], dataset.train_images))}
    assert len(index) == 60  # every training example is distinguishable
    batch = 7
    steps = dataset.single_pass_steps(batch, T)
    batches = [dataset.train_batch(step, 5, batch, T) for step in range(steps + 1)]
    assert all(len(part) == batch for b in batches for part in b)  # the last one straddles two epochs
    rows = [index[key(x, im)] for b in batches for x, im in zip(b[0], b[2])]  # KeyError: text and image split up
    first = rows[: steps * batch]
    assert len(set(first)) == len(first)  # no example twice within the epoch
    assert len(set(rows)) == 60  # the straddling batch completes the epoch, then starts the next
    again = dataset.train_batch(3, 5, batch, T)
    assert all(torch.equal(a, b) for a, b in zip(again, batches[3]))  # a pure function of (seed, step)
    assert not torch.equal(dataset.train_batch(3, 6, batch, T)[0], batches[3][0])


def test_val_types_align_with_val_batches():
    dataset = load_dataset(config(scene="shapes"))
    T = dataset.seq_len
    batches = dataset.val_batches(45, T, 8)
    types = dataset.val_types(45)
    inputs = torch.cat([b[0] for b in batches]).numpy()
    assert len(types) == len(inputs) == 45
    for x, t in zip(inputs, types):
        words = decode(x).split()
        assert qtype_of(words[1 : words.index("?")]) == dataset.question_types[t]
    images = torch.cat([b[2] for b in batches])
    assert torch.equal(images, torch.from_numpy(dataset.test_images[:45]).float() / 255)
    assert len(dataset.val_types(None)) == SMALL["n_val"]


# -- bad settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("settings, field, message", [
    ({"questions": ["colour"]}, "questions", "valid: \\['position', 'count', 'compare', 'caption'\\]"),
    ({"questions": ["riddle"], "scene": "shapes"}, "questions", "valid"),
    ({"cell": 5}, "cell", "multiple of 8"),
    ({"cell": 12}, "cell", "multiple of 8"),
    ({"grid": 1, "questions": ["compare"]}, "questions", "grid ≥ 2"),
    ({"scene": "shapes", "grid": 1}, "grid", "grid ≥ 2"),
    ({"scene": "shapes", "cell": 4}, "cell", "≥ 6"),
    ({"format": "caption", "questions": ["count"]}, "questions", "format 'caption'"),
    ({"grid": 5}, "grid", "less than or equal to 4"),
])
def test_bad_settings_are_refused_naming_the_field(settings, field, message):
    with pytest.raises(ValidationError, match=message) as error:
        config(**settings)
    assert any(field in e["loc"] for e in error.value.errors())
