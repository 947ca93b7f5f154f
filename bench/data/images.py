"""Image question answering on real pixels, offline and seeded: data for vision-language models.

Each example is one small image — a grid × grid arrangement of cells — and a question about it,
answered in words from one fixed vocabulary (``VOCAB``, shared by both scenes):

    digits  each cell holds one of scikit-learn's bundled 8×8 UCI handwritten digits (1,797 images,
            no download; upsampled by an integer factor when ``cell`` is a multiple of 8). Questions:
            position  "which digit is top left ?"      → "3"   (grid 1: "which digit ?")
            count     "how many 7 ?"                   → "1"   (the digit is present about half the time)
            compare   "is left sum larger ?"           → "no"  (labels summed over the left vs right half
                      of the columns; for an odd grid the middle column belongs to neither; scenes whose
                      sums tie are redrawn, so the answer is always a clean yes or no)
            caption   "caption ?"                      → "3 7 1 0" (reading order)
    shapes  rendered with numpy on black: each cell empty or one shape (circle, square, triangle) in one
            colour (red, green, blue, yellow), inside a 1-pixel margin. Questions:
            position  "what shape is top left ?"       → "circle" or "empty"
            colour    "what colour is top left ?"      → "red"  (only non-empty cells are asked about)
            count     "how many red ?" / "how many circle ?" → "2" (present about half the time)
            exists    "is there a blue square ?"       → "yes" / "no" (about half each)
            caption   "caption ?"                      → "red circle , empty , blue square , green triangle"

Cells are named by row then column: grid 2 top/bottom × left/right, grid 3 top/middle/bottom ×
left/center/right, grid 4 top/upper/lower/bottom × far left/left/right/far right.

Sequences are ``<bos> question ? answer <eos>``, right-padded with ``<pad>`` to a length fixed by the
settings (``ImagesConfig.seq_len`` + 1, for next-token shifting). Inputs are the sequence without its
last token; the targets are the next token at the positions whose next token is an answer word or the
final ``<eos>``, and -1 (no loss) everywhere else: the question and the padding are never scored.
``format: caption`` asks the caption alone (``<bos> caption ? words <eos>``): captioning, and the text
side of contrastive image–text pairs.

Train/validation split — no validation scene's source is seen in training:
    digits  the SOURCE images are split by a seeded permutation: a ``val_sources`` fraction forms the
            validation pool and the rest the training pool; training scenes draw digit images only from
            the training pool and validation scenes only from the validation pool, so no validation digit
            image (hence no pixel block) appears in any training scene.
    shapes  train and validation scenes come from separate seeded random streams, and any validation
            scene whose cell contents equal a training scene's is redrawn. A 1×1 grid has only 13 possible
            scenes, too few to hold any out, so shapes need grid ≥ 2.

Question types are cycled (example i asks type i mod k), so every type is equally represented in
training and in any prefix of the validation set. Everything is a pure function of the config.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from bench.data.datasets import ExampleDataset, _order
from bench.data.source import Source
from bench.data.tokenizers import Tokenizer

IGNORE = -1
DIGIT_SIDE = 8  # scikit-learn's digits are 8×8 pixels
MAX_TRIES = 1000  # redraws of one scene before a constraint is declared unsatisfiable

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
EMPTY_PROBABILITY = 0.25  # a shapes cell is empty this often, so "empty" is a common answer too

# rows and columns by grid size: a cell's position is its row words then its column words
ROW_WORDS = {1: ((),), 2: (("top",), ("bottom",)), 3: (("top",), ("middle",), ("bottom",)),
             4: (("top",), ("upper",), ("lower",), ("bottom",))}
COLUMN_WORDS = {1: ((),), 2: (("left",), ("right",)), 3: (("left",), ("center",), ("right",)),
                4: (("far", "left"), ("left",), ("right",), ("far", "right"))}

VOCAB: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "?", ",",
    *(str(d) for d in range(10)),  # digits, and counts
    "yes", "no",
    "top", "upper", "middle", "lower", "bottom", "left", "center", "right", "far",
    "which", "digit", "is", "how", "many", "what", "colour", "shape", "larger", "sum", "there", "a", "caption",
    *COLOURS, *SHAPES, "empty",
)
PAD, BOS, EOS = 0, 1, 2
_IDS = {word: i for i, word in enumerate(VOCAB)}

QUESTION_TYPES = {"digits": ("position", "count", "compare", "caption"),
                  "shapes": ("position", "colour", "count", "exists", "caption")}
NEEDS_TWO_COLUMNS = {"compare"}  # left vs right halves need at least two columns


# -- vocabulary -----------------------------------------------------------------------------------


def encode(words: str | Iterable[str]) -> list[int]:
    """Token ids of words (a string is split on whitespace). A word outside VOCAB is a bug: refused."""
    words = words.split() if isinstance(words, str) else list(words)
    unknown = [w for w in words if w not in _IDS]
    if unknown:
        raise ValueError(f"words {unknown} are not in the image-QA vocabulary")
    return [_IDS[w] for w in words]


def decode(ids: Iterable[int]) -> str:
    """The words of token ids, space-separated (padding included: nothing is hidden)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < len(VOCAB)]
    if bad:
        raise ValueError(f"ids {bad} are outside the {len(VOCAB)}-word image-QA vocabulary")
    return " ".join(VOCAB[i] for i in ids)


# -- positions ------------------------------------------------------------------------------------


def position_words(grid: int, row: int, column: int) -> tuple[str, ...]:
    """The words naming a cell (empty for a 1×1 grid, whose one cell needs no name)."""
    return ROW_WORDS[grid][row] + COLUMN_WORDS[grid][column]


def _cell_named(grid: int, words: Sequence[str]) -> tuple[int, int]:
    for row in range(grid):
        for column in range(grid):
            if tuple(words) == position_words(grid, row, column):
                return row, column
    raise ValueError(f"'{' '.join(words)}' names no cell of a {grid}×{grid} grid")


def _asked_cell(grid: int, words: Sequence[str], lead: int) -> tuple[int, int]:
    """The cell a position question names after its `lead` words (and "is"), e.g. which digit is …"""
    rest = list(words[lead:])
    if rest and rest[0] == "is":
        rest = rest[1:]
    return _cell_named(grid, rest)


def _halves(grid: int) -> tuple[slice, slice]:
    """Left and right column halves; an odd grid's middle column belongs to neither."""
    return slice(0, grid // 2), slice((grid + 1) // 2, grid)


def _question_words(question: str | Sequence[str]) -> list[str]:
    words = question.split() if isinstance(question, str) else list(question)
    return words[:-1] if words and words[-1] == "?" else words


# -- digits scenes --------------------------------------------------------------------------------


def digits_answer(labels, question: str | Sequence[str]) -> str:
    """The answer to a digits question about a grid of digit labels, e.g. labels [[3, 7], [1, 0]] and
    "which digit is top left ?" → "3", "how many 7 ?" → "1", "is left sum larger ?" → "no" (4 vs 7),
    "caption ?" → "3 7 1 0"."""
    labels = np.asarray(labels)
    grid = labels.shape[0]
    words = _question_words(question)
    if words[:2] == ["which", "digit"]:
        return str(int(labels[_asked_cell(grid, words, 2)]))
    if words[:2] == ["how", "many"] and len(words) == 3:
        return str(int((labels == int(words[2])).sum()))
    if len(words) == 4 and words[0] == "is" and words[2:] == ["sum", "larger"]:
        left, right = (int(labels[:, half].sum()) for half in _halves(grid))
        return "yes" if (left > right if words[1] == "left" else right > left) else "no"
    if words == ["caption"]:
        return digits_caption(labels)
    raise ValueError(f"not a digits question: '{' '.join(words)}'")


def digits_caption(labels) -> str:
    """The digits in reading order (rows top to bottom, each left to right)."""
    return " ".join(str(int(d)) for d in np.asarray(labels).reshape(-1))


def _digits_question(rng: np.random.Generator, qtype: str, labels: np.ndarray) -> list[str] | None:
    """A question of type `qtype` about `labels`, or None when the scene cannot be asked it cleanly
    (a tie for compare, a count beyond the count words): the caller redraws the scene."""
    grid = labels.shape[0]
    if qtype == "position":
        row, column = rng.integers(grid, size=2)
        where = position_words(grid, row, column)
        return ["which", "digit", *(["is", *where] if where else [])]
    if qtype == "count":
        digit = _present_or_absent(rng, set(labels.reshape(-1).tolist()), range(10))
        return ["how", "many", str(digit)] if (labels == digit).sum() <= 9 else None
    if qtype == "compare":
        left, right = (int(labels[:, half].sum()) for half in _halves(grid))
        return None if left == right else ["is", str(rng.choice(["left", "right"])), "sum", "larger"]
    if qtype == "caption":
        return ["caption"]
    raise ValueError(f"unknown digits question type '{qtype}'")


def _present_or_absent(rng: np.random.Generator, present: set, universe: Iterable):
    """A value present in the scene half the time and an absent one otherwise, so counts and
    yes/no answers are not dominated by 0 or "no" (falls back to whichever side is non-empty)."""
    absent = [v for v in universe if v not in present]
    options = sorted(present) if rng.random() < 0.5 else absent
    options = options or sorted(present) or absent
    return options[int(rng.integers(len(options)))]


@functools.lru_cache(maxsize=1)
def digits_source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 (N, 8, 8) pixels in 0..255, and their labels."""
    from sklearn.datasets import load_digits  # imported here: sklearn is slow to import, and only digits need it

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return pixels, digits.target.astype(np.int64)


def digits_split(n_images: int, val_sources: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train pool, val pool): source image indices split by a seeded permutation."""
    order = np.random.default_rng([seed, 2]).permutation(n_images)
    n_val = min(n_images - 1, max(1, round(val_sources * n_images)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _digits_examples(rng: np.random.Generator, n: int, types: Sequence[str], pool: np.ndarray,
                     labels_of: np.ndarray, grid: int):
    """n scenes (source indices (n, grid, grid)) with their question and answer words."""
    sources = np.zeros((n, grid, grid), dtype=np.int64)
    qa = []
    for i in range(n):
        qtype = types[i % len(types)]
        for _ in range(MAX_TRIES):
            chosen = pool[rng.integers(len(pool), size=(grid, grid))]
            question = _digits_question(rng, qtype, labels_of[chosen])
            if question is not None:
                break
        else:
            raise RuntimeError(f"no digits scene in {MAX_TRIES} draws suits a '{qtype}' question")
        sources[i] = chosen
        qa.append((question, digits_answer(labels_of[chosen], question).split()))
    return sources, qa


# -- shapes scenes --------------------------------------------------------------------------------
# a cell is a code: 0 = empty, 1 + shape·4 + colour otherwise


def shape_code(words: str) -> int:
    """The code of a cell described as "empty" or "<colour> <shape>", e.g. "red circle"."""
    if words == "empty":
        return 0
    colour, shape = words.split()
    return 1 + SHAPES.index(shape) * len(COLOURS) + COLOURS.index(colour)


def cell_words(code: int) -> list[str]:
    """A cell's description: ["empty"] or [colour, shape]."""
    if code == 0:
        return ["empty"]
    shape, colour = divmod(int(code) - 1, len(COLOURS))
    return [COLOURS[colour], SHAPES[shape]]


def shapes_codes(cells) -> np.ndarray:
    """A grid of cells as codes, from codes or from descriptions such as [["red circle", "empty"], …]."""
    array = np.asarray(cells)
    if array.dtype.kind in "US":
        return np.vectorize(shape_code, otypes=[np.int64])(array)
    return array.astype(np.int64)


def shapes_answer(cells, question: str | Sequence[str]) -> str:
    """The answer to a shapes question about a grid of cells (codes or descriptions), e.g.
    [["red circle", "empty"], ["blue square", "green triangle"]] and "what shape is top left ?" →
    "circle", "how many red ?" → "1", "is there a blue square ?" → "yes"."""
    codes = shapes_codes(cells)
    grid = codes.shape[0]
    words = _question_words(question)
    described = [cell_words(c) for c in codes.reshape(-1)]
    if words[:2] == ["what", "shape"]:
        cell = cell_words(codes[_asked_cell(grid, words, 2)])
        return cell[-1]  # the shape, or "empty"
    if words[:2] == ["what", "colour"]:
        cell = cell_words(codes[_asked_cell(grid, words, 2)])
        if cell == ["empty"]:
            raise ValueError("an empty cell has no colour: colour questions ask about non-empty cells")
        return cell[0]
    if words[:2] == ["how", "many"] and len(words) == 3:
        return str(sum(words[2] in cell for cell in described))
    if words[:3] == ["is", "there", "a"] and len(words) == 5:
        return "yes" if words[3:] in described else "no"
    if words == ["caption"]:
        return shapes_caption(codes)
    raise ValueError(f"not a shapes question: '{' '.join(words)}'")


def shapes_caption(cells) -> str:
    """The cells in reading order, comma-separated: "red circle , empty , blue square , …"."""
    return " , ".join(" ".join(cell_words(c)) for c in shapes_codes(cells).reshape(-1))


def _draw_shapes_scene(rng: np.random.Generator, grid: int) -> np.ndarray:
    empty = rng.random((grid, grid)) < EMPTY_PROBABILITY
    return np.where(empty, 0, rng.integers(1, 1 + len(SHAPES) * len(COLOURS), size=(grid, grid)))


def _shapes_question(rng: np.random.Generator, qtype: str, codes: np.ndarray) -> list[str] | None:
    """A question of type `qtype` about `codes`, or None when the scene cannot be asked it (no
    non-empty cell for colour or a "yes" exists question, a count beyond the count words)."""
    grid = codes.shape[0]
    filled = [tuple(cell) for cell in np.argwhere(codes > 0)]
    if qtype == "position":
        where = position_words(grid, *rng.integers(grid, size=2))
        return ["what", "shape", *(["is", *where] if where else [])]
    if qtype == "colour":
        if not filled:
            return None
        where = position_words(grid, *filled[int(rng.integers(len(filled)))])
        return ["what", "colour", *(["is", *where] if where else [])]
    described = [cell_words(c) for c in codes.reshape(-1)]
    if qtype == "count":
        universe = COLOURS if rng.random() < 0.5 else SHAPES  # which attribute to count
        present = {w for cell in described for w in cell if w in universe}
        value = _present_or_absent(rng, present, universe)
        return ["how", "many", value] if sum(value in cell for cell in described) <= 9 else None
    if qtype == "exists":
        present = {tuple(cell) for cell in described if cell != ["empty"]}
        kinds = [(colour, shape) for shape in SHAPES for colour in COLOURS]
        options = sorted(present) if rng.random() < 0.5 else [k for k in kinds if k not in present]
        if not options:  # redraw rather than flip the answer, so yes and no stay balanced
            return None
        return ["is", "there", "a", *options[int(rng.integers(len(options)))]]
    if qtype == "caption":
        return ["caption"]
    raise ValueError(f"unknown shapes question type '{qtype}'")


def _shapes_examples(rng: np.random.Generator, n: int, types: Sequence[str], grid: int,
                     forbidden: set[bytes] | None = None):
    """n scenes (codes (n, grid, grid)) with question and answer words; scenes whose contents are in
    `forbidden` (the training scenes, when drawing validation) are redrawn."""
    scenes = np.zeros((n, grid, grid), dtype=np.int64)
    qa = []
    for i in range(n):
        qtype = types[i % len(types)]
        for _ in range(MAX_TRIES):
            codes = _draw_shapes_scene(rng, grid)
            if forbidden is not None and codes.tobytes() in forbidden:
                continue
            question = _shapes_question(rng, qtype, codes)
            if question is not None:
                break
        else:
            raise RuntimeError(f"no shapes scene in {MAX_TRIES} draws suits a '{qtype}' question and differs "
                               "from every training scene: use a larger grid or fewer training scenes")
        scenes[i] = codes
        qa.append((question, shapes_answer(codes, question).split()))
    return scenes, qa


def shape_mask(shape: str, cell: int) -> np.ndarray:
    """Where a shape covers a cell×cell block: inside a 1-pixel margin, in coordinates u (across) and
    v (down) of the pixel centres in [-1, 1]. The three shapes cover different pixel counts at every
    size (square > circle > triangle), so even at cell 8 they differ in area as well as outline."""
    n = cell - 2
    centres = (np.arange(n) + 0.5) / n * 2 - 1
    v, u = np.meshgrid(centres, centres, indexing="ij")
    inside = {"square": np.ones((n, n), dtype=bool),
              "circle": u * u + v * v <= 0.85,  # 0.85, not 1: at 6×6 a unit disk is a square missing 4 corners
              "triangle": np.abs(u) <= (v + 1) / 2}[shape]  # apex at the top, base along the bottom
    mask = np.zeros((cell, cell), dtype=bool)
    mask[1:-1, 1:-1] = inside
    return mask


@functools.lru_cache(maxsize=8)
def _sprites(cell: int) -> np.ndarray:
    """(13, 3, cell, cell) uint8 RGB image of each cell code (code 0: black)."""
    sprites = np.zeros((1 + len(SHAPES) * len(COLOURS), 3, cell, cell), dtype=np.uint8)
    for code in range(1, len(sprites)):
        colour, shape = cell_words(code)
        sprites[code] = shape_mask(shape, cell)[None] * np.array(RGB[colour], dtype=np.uint8)[:, None, None]
    return sprites


def render_shapes(cells, cell: int = 8) -> np.ndarray:
    """The (3, grid·cell, grid·cell) uint8 RGB image of one grid of cells (codes or descriptions)."""
    return _tile(_sprites(cell)[shapes_codes(cells)][None])[0]


def _tile(blocks: np.ndarray) -> np.ndarray:
    """(N, grid, grid, C, cell, cell) blocks → (N, C, grid·cell, grid·cell) images."""
    n, grid, _, channels, cell, _ = blocks.shape
    return np.ascontiguousarray(blocks.transpose(0, 3, 1, 4, 2, 5).reshape(n, channels, grid * cell, grid * cell))


# -- sequences ------------------------------------------------------------------------------------


def _max_lengths(scene: str, qtype: str, grid: int) -> tuple[int, int]:
    """(question words, answer words) of the longest question of a type, without "?"."""
    where = max(len(position_words(grid, r, c)) for r in range(grid) for c in range(grid))
    located = 2 + (1 + where if where else 0)  # which digit | what shape/colour [is <where>]
    cells = grid * grid
    return {
        ("digits", "position"): (located, 1), ("digits", "count"): (3, 1), ("digits", "compare"): (4, 1),
        ("digits", "caption"): (1, cells),
        ("shapes", "position"): (located, 1), ("shapes", "colour"): (located, 1), ("shapes", "count"): (3, 1),
        ("shapes", "exists"): (5, 1), ("shapes", "caption"): (1, 2 * cells + cells - 1),  # words and commas
    }[scene, qtype]


def sequences(qa: Sequence[tuple[list[str], list[str]]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (N, seq_len) and targets (N, seq_len) of ``<bos> question ? answer <eos> <pad>…``: the
    targets are the next token where it is an answer word or the final <eos>, -1 elsewhere."""
    tokens = np.full((len(qa), seq_len + 1), PAD, dtype=np.int64)
    targets = np.full((len(qa), seq_len), IGNORE, dtype=np.int64)
    for i, (question, answer) in enumerate(qa):
        row = [BOS, *encode(question), _IDS["?"], *encode(answer), EOS]
        if len(row) > seq_len + 1:
            raise AssertionError(f"'{decode(row)}' is longer than seq_len {seq_len} + 1: _max_lengths is wrong")
        tokens[i, : len(row)] = row
        asked = len(question) + 1  # the "?" position predicts the first answer word
        targets[i, asked : asked + len(answer) + 1] = row[asked + 1 : asked + len(answer) + 2]
    return tokens[:, :-1], targets


# -- configuration --------------------------------------------------------------------------------


class WordTokenizer(Tokenizer):
    """The image tasks' words as tokens: a prompt is space-separated words of ``VOCAB``, begun with
    ``<bos>`` as every training sequence is (added when the text does not start with it)."""

    name = "words"
    vocab_size = len(VOCAB)

    def encode(self, text: str) -> np.ndarray:
        words = text.replace("?", " ? ").replace(",", " , ").split()
        return np.asarray(encode(words if words[:1] == ["<bos>"] else ["<bos>", *words]), dtype=np.int64)

    def decode(self, ids) -> str:
        return decode(ids)

    def token_bytes(self) -> np.ndarray:
        return np.array([len(word.encode()) for word in VOCAB])


class ImagesConfig(Source):
    source: Literal["images"] = "images"
    scene: Literal["digits", "shapes"] = "digits"
    grid: int = Field(2, ge=1, le=4, description="cells per side of the image")
    cell: int = Field(8, ge=1, le=64, description="pixels per cell side (digits: 8 or a multiple of 8)")
    format: Literal["qa", "caption"] = Field("qa", description="qa: a question, loss on its answer; caption: the "
                                             "caption alone after a fixed prompt (captioning, contrastive pairs)")
    questions: tuple[str, ...] | None = Field(None, description="question types to ask (default: all the "
                                              "scene's that the grid allows)")
    n_train: int = Field(4000, ge=1)
    n_val: int = Field(500, ge=1)
    val_sources: float = Field(0.2, gt=0, lt=1, description="digits: fraction of the source images held out "
                               "for validation scenes")
    seed: int = 0

    @field_validator("grid")
    @classmethod
    def _grid_holds_out_scenes(cls, grid: int, info: ValidationInfo) -> int:
        if info.data.get("scene") == "shapes" and grid < 2:
            raise ValueError("shapes need grid ≥ 2: a 1×1 grid has only 13 possible scenes, too few to hold "
                             "validation scenes out of training")
        return grid

    @field_validator("cell")
    @classmethod
    def _cell_fits_the_scene(cls, cell: int, info: ValidationInfo) -> int:
        scene = info.data.get("scene")
        if scene == "digits" and cell % DIGIT_SIDE:
            raise ValueError(f"cell must be 8 or a multiple of 8 for digits (8×8 source images, upsampled by an "
                             f"integer factor), not {cell}")
        if scene == "shapes" and cell < 6:
            raise ValueError(f"cell must be ≥ 6 for shapes (a 1-pixel margin around a shape of ≥ 4×4), not {cell}")
        return cell

    @field_validator("questions")
    @classmethod
    def _known_questions(cls, questions: tuple[str, ...] | None, info: ValidationInfo):
        if questions is None:
            return None
        scene, grid, fmt = info.data.get("scene"), info.data.get("grid"), info.data.get("format")
        valid = QUESTION_TYPES.get(scene, ())
        unknown = [q for q in questions if q not in valid]
        if unknown:
            raise ValueError(f"questions {unknown} are not {scene} question types; valid: {list(valid)}")
        if not questions or len(set(questions)) != len(questions):
            raise ValueError(f"questions must name each type once, and at least one: {list(questions)}")
        if grid is not None and grid < 2 and NEEDS_TWO_COLUMNS & set(questions):
            raise ValueError("questions: 'compare' sums the left and right halves of the columns and needs grid ≥ 2")
        if fmt == "caption" and list(questions) != ["caption"]:
            raise ValueError(f"questions must be left out (or ['caption']) with format 'caption', not {list(questions)}")
        return tuple(questions)

    def question_types(self) -> list[str]:
        """The question types asked, in the order examples cycle through them."""
        if self.format == "caption":
            return ["caption"]
        if self.questions is not None:
            return list(self.questions)
        return [q for q in QUESTION_TYPES[self.scene] if self.grid >= 2 or q not in NEEDS_TWO_COLUMNS]

    def known_vocab_size(self) -> int:
        return len(VOCAB)

    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width): digits are grey (1 channel), shapes RGB (3)."""
        side = self.grid * self.cell
        return (1 if self.scene == "digits" else 3, side, side)

    @property
    def seq_len(self) -> int:
        """Model input length: the longest ``<bos> question ? answer <eos>`` of these settings, less one."""
        return max(q + 1 + a + 2 for q, a in (_max_lengths(self.scene, t, self.grid) for t in self.question_types())) - 1

    def load(self) -> ImageDataset:
        return _images(self)

    def fitted_tokenizer(self) -> WordTokenizer:
        """The fixed word vocabulary as a tokenizer (serving encodes text prompts with it)."""
        return WordTokenizer()


# -- dataset --------------------------------------------------------------------------------------

ImageBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, targets (B, T); images (B, C, H, W)


@dataclass
class ImageDataset(ExampleDataset):
    """Image QA examples: every batch is (inputs (B, T) int64, targets (B, T) int64 with -1 = no loss,
    images (B, C, H, W) float32 in [0, 1]). Training goes through seeded epoch permutations like
    ExampleDataset; validation is the fixed test examples in order.

    train_scenes / test_scenes: each example's cells (N, grid, grid) — digits: the source image index
    into scikit-learn's digits; shapes: the cell code (0 empty, 1 + shape·4 + colour)."""

    train_images: np.ndarray = None  # uint8 (N, C, H, W)
    test_images: np.ndarray = None
    train_types: np.ndarray = None  # (N,) index into question_types
    test_types: np.ndarray = None
    train_scenes: np.ndarray = None
    test_scenes: np.ndarray = None
    question_types: list[str] = field(default_factory=list)
    vocabulary: tuple[str, ...] = VOCAB
    image_shape: tuple[int, int, int] = None
    scene: str = "digits"

    def _batch(self, part: str, rows) -> ImageBatch:
        inputs, targets = self.train if part == "train" else self.test
        images = self.train_images if part == "train" else self.test_images
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        return as_long(inputs[rows]), as_long(targets[rows]), torch.from_numpy(images[rows]).float().div_(255)

    def _draw(self, rng, batch_size, seq_len):
        self.check_seq_len(seq_len)
        return self._batch("train", rng.integers(0, len(self.train[0]), batch_size))

    def _examples(self, epoch, positions, seed, seq_len):
        return self._batch("train", _order(seed, epoch, len(self.train[0]))[positions])

    def train_batch(self, step: int, seed: int, batch_size: int, seq_len: int) -> ImageBatch:
        """As ExampleDataset's (examples step·batch_size onwards of the seed's epochs), with images."""
        self.check_seq_len(seq_len)
        per_epoch = self.examples_per_epoch(seq_len)
        index = step * batch_size + np.arange(batch_size)
        parts = [self._examples(int(e), index[index // per_epoch == e] % per_epoch, seed, seq_len)
                 for e in np.unique(index // per_epoch)]  # a batch may straddle two epochs
        return tuple(torch.cat(column) for column in zip(*parts))

    def _val_count(self, n_sequences: int | None) -> int:
        return len(self.test[0]) if n_sequences is None else min(len(self.test[0]), n_sequences)

    def val_batches(self, n_sequences, seq_len, chunk) -> list[ImageBatch]:
        self.check_seq_len(seq_len)
        n = self._val_count(n_sequences)
        return [self._batch("test", np.arange(i, min(i + chunk, n))) for i in range(0, n, chunk)]

    def decode(self, ids) -> str:
        """Token ids -> words of the vocabulary, space-separated."""
        return decode(ids)

    def val_types(self, n_sequences: int | None = None) -> np.ndarray:
        """The question type index (into question_types) of each example val_batches yields, in order."""
        return self.test_types[: self._val_count(n_sequences)]


def _digit_pixels(cell: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, cell, cell) digit images upsampled by cell / 8 (nearest neighbour), and their labels."""
    pixels, labels = digits_source()
    factor = cell // DIGIT_SIDE
    return pixels.repeat(factor, axis=1).repeat(factor, axis=2)[:, None], labels


def _sha256(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _images(config: ImagesConfig) -> ImageDataset:
    types = config.question_types()
    train_rng, val_rng = np.random.default_rng([config.seed, 0]), np.random.default_rng([config.seed, 1])
    if config.scene == "digits":
        pixels, labels = _digit_pixels(config.cell)
        train_pool, val_pool = digits_split(len(labels), config.val_sources, config.seed)
        train_scenes, train_qa = _digits_examples(train_rng, config.n_train, types, train_pool, labels, config.grid)
        test_scenes, test_qa = _digits_examples(val_rng, config.n_val, types, val_pool, labels, config.grid)
        blocks = pixels
    else:
        train_scenes, train_qa = _shapes_examples(train_rng, config.n_train, types, config.grid)
        seen = {scene.tobytes() for scene in train_scenes}
        test_scenes, test_qa = _shapes_examples(val_rng, config.n_val, types, config.grid, forbidden=seen)
        blocks = _sprites(config.cell)
    seq_len = config.seq_len
    train, test = sequences(train_qa, seq_len), sequences(test_qa, seq_len)
    train_images, test_images = _tile(blocks[train_scenes]), _tile(blocks[test_scenes])
    cycle = lambda n: np.arange(n) % len(types)  # noqa: E731  (the generators cycle types the same way)
    fingerprint = {"source": "images", "scene": config.scene, "grid": config.grid, "cell": config.cell,
                   "format": config.format, "question_types": types, "n_train": config.n_train,
                   "n_val": config.n_val, "vocab_size": len(VOCAB), "seq_len": seq_len,
                   "sha256": _sha256(*train, *test, train_images, test_images)}
    return ImageDataset(vocab_size=len(VOCAB), kind="image", seq_len=seq_len, fingerprint=fingerprint,
                        train=train, test=test, train_images=train_images, test_images=test_images,
                        train_types=cycle(config.n_train), test_types=cycle(config.n_val),
                        train_scenes=train_scenes, test_scenes=test_scenes, question_types=types,
                        vocabulary=VOCAB, image_shape=config.image_shape(), scene=config.scene)
