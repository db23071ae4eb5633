"""Inner training tasks for meta-training learned optimizers.

The two small protocols follow learned_optimization (Metz et al., arXiv:2203.11860): a
:class:`TaskFamily` samples :class:`Task` s; a task is functional -- ``init(generator)`` returns a
dict of parameters, ``sample_batch(generator)`` returns a tuple of tensors and ``loss(params, batch)``
returns a scalar. Every task of one family has the same architecture, so ``loss`` is the same
function for all of them and many inner problems run in one ``torch.func.vmap`` call over stacked
parameters and batches (see :func:`stack_params` and :func:`sample_batches`). The data that makes
two tasks differ (a teacher network, class means, which Omniglot characters) lives in the task and
only shapes what ``sample_batch`` returns.

Families: noisy quadratics, MLP classifiers of Gaussian-mixture data, teacher-student MLP
regression, small convnets on synthetic template images, character-level GRU language models and small
causal transformers on English text that ships with Python, and (when the shared data is present) Omniglot
characters at low resolution (:mod:`lightning_meta.optim.meta.omniglot`).

A family may vary the architecture itself (the MLP families' ``widths``, ``depths`` and ``batch_sizes``). Such a
family draws the sizes once per *population* (:func:`sample_tasks`), so the tasks that run together in one vmapped
call still share them; each new population draws new sizes. This is learned_optimization's split between a
sampled task-family configuration and the tasks of one family.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from inspect import signature
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Batch",
    "ConvTask",
    "ConvTaskFamily",
    "GRULanguageModelTask",
    "GRULanguageModelTaskFamily",
    "MLPTask",
    "MLPTaskFamily",
    "Params",
    "QuadraticTask",
    "QuadraticTaskFamily",
    "Task",
    "TaskFamily",
    "TeacherStudentTaskFamily",
    "TransformerLanguageModelTask",
    "TransformerLanguageModelTaskFamily",
    "family_names",
    "family_parameters",
    "get_family",
    "sample_batches",
    "sample_tasks",
    "stack_params",
    "transformer_block",
]

Params = dict[str, Tensor]
Batch = tuple[Tensor, ...]

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu}
_SPLITS = ("train", "valid")


@runtime_checkable
class Task(Protocol):
    """One inner training problem: initial parameters, a data stream and a loss."""

    name: str

    def init(self, generator: torch.Generator) -> Params:
        """Draws initial parameters."""

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        """Draws one minibatch from the ``"train"`` or the ``"valid"`` split."""

    def loss(self, params: Params, batch: Batch) -> Tensor:
        """Scalar loss of ``params`` on ``batch``; pure, so it can be vmapped and differentiated."""


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution over tasks that share one architecture (so their losses can be vmapped)."""

    name: str

    def sample(self, generator: torch.Generator) -> Task:
        """Draws one task."""


def sample_tasks(family: TaskFamily, generator: torch.Generator, n: int) -> list[Task]:
    """``n`` tasks that share one architecture and batch size, so their losses vmap together.

    Uses the family's ``sample_population(generator, n)`` where it has one (families that vary their sizes draw
    the sizes once there, then ``n`` tasks of those sizes), else ``n`` calls of ``family.sample(generator)``.
    """
    population = getattr(family, "sample_population", None)
    if population is not None:
        return list(population(generator, n))
    return [family.sample(generator) for _ in range(n)]


def stack_params(params: Sequence[Params]) -> Params:
    """Stacks the parameters of several inner problems along a new leading dimension."""
    return {k: torch.stack([p[k] for p in params]) for k in params[0]}


def sample_batches(tasks: Sequence[Task], generator: torch.Generator, split: str = "train") -> Batch:
    """One minibatch per task, stacked along a new leading dimension (one entry per task)."""
    batches = [t.sample_batch(generator, split) for t in tasks]
    return tuple(torch.stack(parts) for parts in zip(*batches))


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not one of {_SPLITS}")


def _dense_init(generator: torch.Generator, sizes: Sequence[int], prefix: str = "") -> Params:
    """He-initialised weights ``w{i}`` (in, out) and zero biases ``b{i}`` of an MLP."""
    params: Params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"{prefix}w{i}"] = torch.randn(n_in, n_out, generator=generator) * math.sqrt(2.0 / n_in)
        params[f"{prefix}b{i}"] = torch.zeros(n_out)
    return params


def _size_range(name: str, value: int | Sequence[int] | None, *, minimum: int) -> tuple[int, int] | None:
    """``None``, or ``value`` (an int, or an inclusive ``(low, high)`` pair of ints) as a checked ``(low, high)``."""
    if value is None:
        return None
    bounds = (value, value) if isinstance(value, int) else tuple(value)
    if len(bounds) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds):
        raise ValueError(f"{name}={value!r} must be an int or a (low, high) pair of ints, e.g. {name}=(16, 128)")
    if not minimum <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name}={value!r} must satisfy {minimum} <= low <= high")
    return bounds[0], bounds[1]


def _draw_size(generator: torch.Generator, bounds: tuple[int, int], *, log: bool) -> int:
    """An int in ``[low, high]``: log-uniform (a log-uniform real in ``[low, high + 1)``, rounded down) or uniform.
    Draws even when ``low == high``, so the random stream does not depend on the range."""
    low, high = bounds
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    if log:
        value = math.exp(math.log(low) + u * (math.log(high + 1) - math.log(low)))
    else:
        value = low + u * (high + 1 - low)
    return min(int(value), high)


@dataclass(frozen=True)
class _SizeRanges:
    """Per-population ranges of an MLP family's hidden width, hidden depth and batch size (``None``: fixed)."""

    widths: tuple[int, int] | None
    depths: tuple[int, int] | None
    batch_sizes: tuple[int, int] | None

    @classmethod
    def check(
        cls,
        widths: int | Sequence[int] | None,
        depths: int | Sequence[int] | None,
        batch_sizes: int | Sequence[int] | None,
        hidden: Sequence[int],
    ) -> _SizeRanges:
        if isinstance(hidden, int):
            raise ValueError(
                f"hidden={hidden} must be a sequence of widths, e.g. hidden=({hidden},) (CLI: hidden={hidden},)"
            )
        ranges = cls(
            _size_range("widths", widths, minimum=1),
            _size_range("depths", depths, minimum=0),
            _size_range("batch_sizes", batch_sizes, minimum=1),
        )
        if ranges.depths is not None and ranges.widths is None and not hidden:
            raise ValueError("depths needs a hidden width: pass widths=(low, high) or a non-empty hidden")
        return ranges

    def draw(self, generator: torch.Generator, sizes: tuple[int, ...], batch_size: int) -> tuple[tuple[int, ...], int]:
        """Layer sizes and batch size of one population; with no ranges, ``sizes`` and ``batch_size`` unchanged
        and nothing drawn. Every hidden layer gets the drawn width (or ``hidden[0]``), ``depth`` layers of it (or
        as many as ``hidden`` has)."""
        hidden = sizes[1:-1]
        width = None if self.widths is None else _draw_size(generator, self.widths, log=True)
        depth = len(hidden) if self.depths is None else _draw_size(generator, self.depths, log=False)
        if width is not None or self.depths is not None:
            hidden = ((hidden[0] if width is None else width),) * depth
        if self.batch_sizes is not None:
            batch_size = _draw_size(generator, self.batch_sizes, log=True)
        return (sizes[0], *hidden, sizes[-1]), batch_size


def _mlp(params: Params, x: Tensor, layers: int, activation: str, prefix: str = "") -> Tensor:
    act = _ACTIVATIONS[activation]
    for i in range(layers):
        x = x @ params[f"{prefix}w{i}"] + params[f"{prefix}b{i}"]
        if i < layers - 1:
            x = act(x)
    return x


# ----------------------------------------------------------------------------------------- quadratic
@dataclass
class QuadraticTask:
    """``0.5 * mean(h * (x - c)^2)`` with a diagonal curvature ``h`` and a noisy centre per batch.

    Args:
        curvature: Diagonal of the Hessian (times the number of entries), same shape as the parameter.
        center: Minimiser.
        noise: Standard deviation of the centre's per-batch noise (gradient noise).
    """

    curvature: Tensor
    center: Tensor
    noise: float
    name: str = "quadratic"

    def init(self, generator: torch.Generator) -> Params:
        return {"x": torch.randn(self.curvature.shape, generator=generator)}

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        _check_split(split)
        noise = self.noise * torch.randn(self.center.shape, generator=generator) if split == "train" else 0.0
        return (self.curvature, self.center + noise)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        curvature, center = batch
        return 0.5 * (curvature * (params["x"] - center) ** 2).mean()


class QuadraticTaskFamily:
    """Noisy diagonal quadratics whose curvatures are log-uniform in ``[min_curvature, max_curvature]``.

    Args:
        shape: Shape of the parameter tensor (a matrix by default, so rules treat it as a weight).
        min_curvature: Smallest curvature.
        max_curvature: Largest curvature.
        noise: Standard deviation of the minimiser's per-batch noise.
    """

    name = "quadratic"

    def __init__(
        self,
        *,
        shape: Sequence[int] = (4, 8),
        min_curvature: float = 0.01,
        max_curvature: float = 10.0,
        noise: float = 0.1,
    ) -> None:
        if not shape or min(shape) < 1:
            raise ValueError(f"shape={tuple(shape)} must be non-empty with positive sizes")
        if not 0 < min_curvature <= max_curvature:
            raise ValueError(f"curvatures [{min_curvature}, {max_curvature}] must satisfy 0 < min <= max")
        self.shape, self.min_curvature, self.max_curvature, self.noise = (
            tuple(shape),
            min_curvature,
            max_curvature,
            noise,
        )

    def sample(self, generator: torch.Generator) -> QuadraticTask:
        lo, hi = math.log(self.min_curvature), math.log(self.max_curvature)
        curvature = torch.exp(lo + (hi - lo) * torch.rand(self.shape, generator=generator))
        return QuadraticTask(curvature, torch.randn(self.shape, generator=generator), self.noise)


# --------------------------------------------------------------------------------------------- MLPs
@dataclass
class MLPTask:
    """An MLP trained on data drawn by ``sampler``: cross-entropy (classification) or MSE (regression).

    Args:
        sizes: Layer widths, input first, output last.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        regression: MSE on float targets instead of cross-entropy on class labels.
        sampler: ``sampler(generator, split) -> (x, y)``; carries the task's data distribution.
    """

    sizes: tuple[int, ...]
    activation: str
    regression: bool
    sampler: Callable[[torch.Generator, str], Batch] = field(repr=False)
    name: str = "mlp"

    def init(self, generator: torch.Generator) -> Params:
        return _dense_init(generator, self.sizes)

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        _check_split(split)
        return self.sampler(generator, split)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        out = _mlp(params, x, len(self.sizes) - 1, self.activation)
        if self.regression:
            return F.mse_loss(out.squeeze(-1), y)
        return F.cross_entropy(out, y)


@dataclass
class _MixtureSampler:
    means: Tensor  # (classes, features)
    batch_size: int
    noise: float

    def __call__(self, generator: torch.Generator, split: str) -> Batch:
        y = torch.randint(self.means.shape[0], (self.batch_size,), generator=generator)
        x = self.means[y] + self.noise * torch.randn(self.batch_size, self.means.shape[1], generator=generator)
        return x, y


class MLPTaskFamily:
    """MLP classifiers of Gaussian-mixture data; each task draws its own class means.

    ``widths``, ``depths`` and ``batch_sizes`` vary the architecture: each population (:func:`sample_tasks`; a
    single :meth:`sample` is a population of one) draws a hidden width log-uniformly from ``widths``, a number of
    hidden layers uniformly from ``depths`` (every hidden layer that wide) and a batch size log-uniformly from
    ``batch_sizes``, in that order and only those given, from the generator passed to it. Ranges are inclusive
    ``(low, high)`` int pairs (an int fixes the value). Left at ``None`` (the default), ``hidden`` and
    ``batch_size`` hold and the draws are those of a family without these arguments.

    Args:
        in_features: Input dimension.
        hidden: Hidden widths.
        classes: Number of classes.
        batch_size: Examples per minibatch.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        noise: Within-class standard deviation (class means are standard normal).
        widths: Range of the hidden width, e.g. ``(16, 128)``.
        depths: Range of the number of hidden layers, e.g. ``(1, 4)`` (0: a linear model).
        batch_sizes: Range of the batch size, e.g. ``(16, 256)``.
    """

    name = "mlp"

    def __init__(
        self,
        *,
        in_features: int = 16,
        hidden: Sequence[int] = (32,),
        classes: int = 4,
        batch_size: int = 32,
        activation: str = "relu",
        noise: float = 1.0,
        widths: int | Sequence[int] | None = None,
        depths: int | Sequence[int] | None = None,
        batch_sizes: int | Sequence[int] | None = None,
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        if classes < 2:
            raise ValueError(f"classes={classes} must be at least 2")
        self.ranges = _SizeRanges.check(widths, depths, batch_sizes, hidden)
        self.sizes = (in_features, *hidden, classes)
        self.batch_size, self.activation, self.noise = batch_size, activation, noise

    def sample(self, generator: torch.Generator) -> MLPTask:
        return self.sample_population(generator, 1)[0]

    def sample_population(self, generator: torch.Generator, n: int) -> list[MLPTask]:
        """``n`` tasks sharing one drawn architecture and batch size (see the class docstring)."""
        sizes, batch_size = self.ranges.draw(generator, self.sizes, self.batch_size)
        tasks = []
        for _ in range(n):
            means = torch.randn(sizes[-1], sizes[0], generator=generator)
            sampler = _MixtureSampler(means, batch_size, self.noise)
            tasks.append(MLPTask(sizes, self.activation, False, sampler, name=self.name))
        return tasks


@dataclass
class _TeacherSampler:
    teacher: Params
    layers: int
    batch_size: int
    in_features: int
    noise: float

    def __call__(self, generator: torch.Generator, split: str) -> Batch:
        x = torch.randn(self.batch_size, self.in_features, generator=generator)
        y = _mlp(self.teacher, x, self.layers, "tanh").squeeze(-1)
        return x, y + self.noise * torch.randn(y.shape, generator=generator)


class TeacherStudentTaskFamily:
    """A student MLP regresses a random tanh teacher MLP (with label noise); each task draws a teacher.

    ``widths``, ``depths`` and ``batch_sizes`` vary the student and the batch size per population, as in
    :class:`MLPTaskFamily` (the teacher keeps ``teacher_hidden``).

    Args:
        in_features: Input dimension.
        teacher_hidden: Hidden widths of the teacher.
        hidden: Hidden widths of the student.
        batch_size: Examples per minibatch.
        activation: The student's activation.
        noise: Label noise standard deviation.
        widths: Range of the student's hidden width.
        depths: Range of the student's number of hidden layers.
        batch_sizes: Range of the batch size.
    """

    name = "teacher_student"

    def __init__(
        self,
        *,
        in_features: int = 8,
        teacher_hidden: Sequence[int] = (16,),
        hidden: Sequence[int] = (32,),
        batch_size: int = 32,
        activation: str = "relu",
        noise: float = 0.05,
        widths: int | Sequence[int] | None = None,
        depths: int | Sequence[int] | None = None,
        batch_sizes: int | Sequence[int] | None = None,
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.ranges = _SizeRanges.check(widths, depths, batch_sizes, hidden)
        self.in_features, self.teacher_sizes = in_features, (in_features, *teacher_hidden, 1)
        self.sizes = (in_features, *hidden, 1)
        self.batch_size, self.activation, self.noise = batch_size, activation, noise

    def sample(self, generator: torch.Generator) -> MLPTask:
        return self.sample_population(generator, 1)[0]

    def sample_population(self, generator: torch.Generator, n: int) -> list[MLPTask]:
        """``n`` tasks sharing one drawn student architecture and batch size (see :class:`MLPTaskFamily`)."""
        sizes, batch_size = self.ranges.draw(generator, self.sizes, self.batch_size)
        tasks = []
        for _ in range(n):
            teacher = _dense_init(generator, self.teacher_sizes)
            for i in range(len(self.teacher_sizes) - 1):  # non-zero biases make the target less symmetric
                teacher[f"b{i}"] = 0.5 * torch.randn(teacher[f"b{i}"].shape, generator=generator)
            layers = len(self.teacher_sizes) - 1
            sampler = _TeacherSampler(teacher, layers, batch_size, self.in_features, self.noise)
            tasks.append(MLPTask(sizes, self.activation, True, sampler, name=self.name))
        return tasks


# ----------------------------------------------------------------------------------------- convnets
@dataclass
class ConvTask:
    """A small convnet (3x3 stride-2 convolutions, ReLU, global mean pool, linear head) on images.

    Args:
        in_channels: Image channels.
        channels: Output channels of each convolution.
        classes: Number of classes.
        sampler: ``sampler(generator, split) -> (images (batch, C, H, W), labels)``.
    """

    in_channels: int
    channels: tuple[int, ...]
    classes: int
    sampler: Callable[[torch.Generator, str], Batch] = field(repr=False)
    name: str = "conv"

    def init(self, generator: torch.Generator) -> Params:
        params: Params = {}
        c_in = self.in_channels
        for i, c_out in enumerate(self.channels):
            fan_in = c_in * 9
            params[f"conv{i}.w"] = torch.randn(c_out, c_in, 3, 3, generator=generator) * math.sqrt(2.0 / fan_in)
            params[f"conv{i}.b"] = torch.zeros(c_out)
            c_in = c_out
        params.update(_dense_init(generator, (c_in, self.classes), prefix="head."))
        return params

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        _check_split(split)
        return self.sampler(generator, split)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        for i in range(len(self.channels)):
            x = torch.relu(F.conv2d(x, params[f"conv{i}.w"], params[f"conv{i}.b"], stride=2, padding=1))
        logits = _mlp(params, x.mean(dim=(-2, -1)), 1, "relu", prefix="head.")
        return F.cross_entropy(logits, y)


@dataclass
class _TemplateSampler:
    templates: Tensor  # (classes, C, H, W)
    batch_size: int
    noise: float

    def __call__(self, generator: torch.Generator, split: str) -> Batch:
        y = torch.randint(self.templates.shape[0], (self.batch_size,), generator=generator)
        x = self.templates[y] + self.noise * torch.randn(
            self.batch_size, *self.templates.shape[1:], generator=generator
        )
        return x, y


class ConvTaskFamily:
    """Convnets classifying noisy copies of random smooth class templates (synthetic images).

    Args:
        image_size: Height and width.
        in_channels: Image channels.
        channels: Output channels of each stride-2 convolution.
        classes: Number of classes.
        batch_size: Images per minibatch.
        noise: Pixel noise standard deviation.
    """

    name = "conv"

    def __init__(
        self,
        *,
        image_size: int = 8,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 8),
        classes: int = 4,
        batch_size: int = 16,
        noise: float = 0.5,
    ) -> None:
        if image_size < 4:
            raise ValueError(f"image_size={image_size} must be at least 4")
        self.image_size, self.in_channels, self.channels = image_size, in_channels, tuple(channels)
        self.classes, self.batch_size, self.noise = classes, batch_size, noise

    def sample(self, generator: torch.Generator) -> ConvTask:
        coarse = torch.randn(self.classes, self.in_channels, 4, 4, generator=generator)
        templates = F.interpolate(coarse, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        sampler = _TemplateSampler(templates, self.batch_size, self.noise)
        return ConvTask(self.in_channels, self.channels, self.classes, sampler, name=self.name)


# ------------------------------------------------------------------------------ character-level GRU LMs
CHAR_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII; any other character: one extra id
CORPORA = ("meta-train", "held-aside")
_CORPUS_CACHE: dict[str, Tensor] = {}


def encode_text(text: str) -> Tensor:
    """Character ids: the index in :data:`CHAR_VOCAB`, or ``len(CHAR_VOCAB)`` for any other character."""
    index = {c: i for i, c in enumerate(CHAR_VOCAB)}
    return torch.tensor([index.get(c, len(CHAR_VOCAB)) for c in text], dtype=torch.long)


def char_corpus(corpus: str = "meta-train") -> Tensor:
    """The encoded text of the GRU language-model tasks: Python's own help topics (``pydoc_data.topics``, the
    text ``help("if")`` shows; about 0.5 M characters of English prose and code, shipped with CPython, read
    offline), topics in sorted order. Every fourth topic (sorted positions 3, 7, ...) is ``"held-aside"`` (for
    validation), the rest ``"meta-train"``. The text, and so the tasks, can differ between Python versions.
    """
    if corpus not in CORPORA:
        raise ValueError(f"corpus={corpus!r} is not one of {CORPORA}")
    if corpus not in _CORPUS_CACHE:
        try:
            from pydoc_data.topics import topics
        except ImportError as err:  # some distributions split the stdlib's help data into another package
            raise ImportError(
                "the GRU language-model tasks read pydoc_data.topics from the standard library, which this "
                "Python lacks; install the full standard library (e.g. Debian's libpython3-stdlib)"
            ) from err
        names = sorted(topics)
        chosen = [n for i, n in enumerate(names) if (i % 4 == 3) == (corpus == "held-aside")]
        _CORPUS_CACHE[corpus] = encode_text("\n\n".join(topics[n] for n in chosen))
    return _CORPUS_CACHE[corpus]


def _char_windows(text: Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` windows of ``seq_len + 1`` consecutive ids of ``text`` at random offsets: (batch, seq_len + 1)."""
    starts = torch.randint(len(text) - seq_len, (batch_size,), generator=generator)
    return text[starts[:, None] + torch.arange(seq_len + 1)]


class _CharLMTask(Protocol):
    train_text: Tensor
    valid_text: Tensor
    seq_len: int
    batch_size: int


def _lm_batch(task: _CharLMTask, generator: torch.Generator, split: str) -> Batch:
    """A character language model's batch: windows of its ``split`` text (one element, the windows)."""
    _check_split(split)
    text = task.train_text if split == "train" else task.valid_text
    return (_char_windows(text, task.seq_len, task.batch_size, generator),)


def _task_text(text: Tensor, task_chars: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A task's ``task_chars`` consecutive characters of ``text`` at a random offset: the first 7/8 to train on,
    the last 1/8 to validate on (disjoint)."""
    start = int(torch.randint(len(text) - task_chars + 1, (), generator=generator))
    chosen = text[start : start + task_chars]
    cut = task_chars * 7 // 8
    return chosen[:cut], chosen[cut:]


def _check_text_sizes(corpus: str, seq_len: int, batch_size: int, task_chars: int) -> Tensor:
    """The encoded ``corpus`` after checking that tasks of ``task_chars`` characters fit it and hold windows."""
    if min(seq_len, batch_size) < 1:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    if task_chars < 16 * (seq_len + 1):
        raise ValueError(f"task_chars={task_chars} must be at least 16 * (seq_len + 1) = {16 * (seq_len + 1)}")
    text = char_corpus(corpus)
    if task_chars > len(text):
        raise ValueError(f"task_chars={task_chars} exceeds the {len(text)} characters of corpus {corpus!r}")
    return text


@dataclass
class GRULanguageModelTask:
    """A one-layer GRU predicting the next character of ``text``: embedding, GRU, linear read-out, cross-entropy
    averaged over the positions of a batch of windows.

    Args:
        train_text: Character ids the ``"train"`` batches are cut from.
        valid_text: Character ids of the ``"valid"`` batches (disjoint from ``train_text``).
        vocab: Number of character ids.
        embed: Embedding width.
        hidden: GRU state width.
        seq_len: Characters predicted per window (a window holds ``seq_len + 1``).
        batch_size: Windows per minibatch.
    """

    train_text: Tensor = field(repr=False)
    valid_text: Tensor = field(repr=False)
    vocab: int
    embed: int
    hidden: int
    seq_len: int
    batch_size: int
    name: str = "gru_lm"

    def init(self, generator: torch.Generator) -> Params:
        e, h, v = self.embed, self.hidden, self.vocab

        def normal(*shape: int, std: float) -> Tensor:
            return torch.randn(*shape, generator=generator) * std

        # gates in the order (reset, update, new) as torch.nn.GRU; weights (in, out) as the dense layers above
        return {
            "embed": normal(v, e, std=1.0),
            "w_ih": normal(e, 3 * h, std=1 / math.sqrt(e)),
            "w_hh": normal(h, 3 * h, std=1 / math.sqrt(h)),
            "b_ih": torch.zeros(3 * h),
            "b_hh": torch.zeros(3 * h),
            "w_out": normal(h, v, std=1 / math.sqrt(h)),
            "b_out": torch.zeros(v),
        }

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        return _lm_batch(self, generator, split)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        (windows,) = batch
        inputs, targets = windows[:, :-1], windows[:, 1:]
        gates_in = params["embed"][inputs] @ params["w_ih"] + params["b_ih"]  # (batch, seq, 3 * hidden)
        state = torch.zeros(inputs.shape[0], self.hidden, dtype=gates_in.dtype)
        states = []
        for t in range(inputs.shape[1]):
            r_in, z_in, n_in = gates_in[:, t].chunk(3, dim=-1)
            r_h, z_h, n_h = (state @ params["w_hh"] + params["b_hh"]).chunk(3, dim=-1)
            reset, update = torch.sigmoid(r_in + r_h), torch.sigmoid(z_in + z_h)
            state = (1 - update) * torch.tanh(n_in + reset * n_h) + update * state
            states.append(state)
        logits = torch.stack(states, dim=1) @ params["w_out"] + params["b_out"]
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))


class GRULanguageModelTaskFamily:
    """Character-level GRU language models; each task draws its own stretch of text from a corpus.

    A task's text is ``task_chars`` consecutive characters of :func:`char_corpus` at a random offset; its first
    7/8 are the training text, the last 1/8 the validation text (disjoint). The vocabulary is fixed (printable
    ASCII, newline and one id for anything else: 97 ids), so the loss at initialisation is about ``log(97)``.

    Args:
        corpus: ``"meta-train"`` or ``"held-aside"`` (disjoint help topics; see :func:`char_corpus`).
        embed: Embedding width.
        hidden: GRU state width.
        seq_len: Characters predicted per window.
        batch_size: Windows per minibatch.
        task_chars: Characters of text per task.
    """

    name = "gru_lm"

    def __init__(
        self,
        *,
        corpus: str = "meta-train",
        embed: int = 16,
        hidden: int = 32,
        seq_len: int = 32,
        batch_size: int = 16,
        task_chars: int = 16384,
    ) -> None:
        if min(embed, hidden) < 1:
            raise ValueError(f"embed={embed} and hidden={hidden} must be >= 1")
        self.text = _check_text_sizes(corpus, seq_len, batch_size, task_chars)
        self.corpus, self.embed, self.hidden, self.seq_len = corpus, embed, hidden, seq_len
        self.batch_size, self.task_chars = batch_size, task_chars

    def sample(self, generator: torch.Generator) -> GRULanguageModelTask:
        train_text, valid_text = _task_text(self.text, self.task_chars, generator)
        return GRULanguageModelTask(
            train_text,
            valid_text,
            len(CHAR_VOCAB) + 1,
            self.embed,
            self.hidden,
            self.seq_len,
            self.batch_size,
            name=self.name,
        )


# --------------------------------------------------------------------- character-level transformer LMs
def _layer_norm(params: Params, x: Tensor, prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], params[f"{prefix}.w"], params[f"{prefix}.b"], eps=1e-5)


def transformer_block(params: Params, x: Tensor, prefix: str, heads: int) -> Tensor:
    """One pre-LN decoder block on ``x`` (batch, seq, d_model): ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``
    with causal multi-head self-attention (scaled by ``1 / sqrt(d_model / heads)``) and a GELU MLP. Weights are
    ``(in, out)``; the query, key and value projections are one ``(d_model, 3 * d_model)`` matrix ``qkv.w``.
    This is ``torch.nn.TransformerEncoderLayer(norm_first=True, activation="gelu", dropout=0)`` with a causal
    mask, written on a parameter dict so it vmaps over stacked parameters and has second derivatives."""
    batch, seq, width = x.shape
    head_dim = width // heads
    h = _layer_norm(params, x, f"{prefix}ln1")
    qkv = h @ params[f"{prefix}qkv.w"] + params[f"{prefix}qkv.b"]
    q, k, v = (t.reshape(batch, seq, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (batch, heads, seq, seq)
    future = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
    attn = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v
    attn = attn.transpose(1, 2).reshape(batch, seq, width)
    x = x + attn @ params[f"{prefix}proj.w"] + params[f"{prefix}proj.b"]
    h = _layer_norm(params, x, f"{prefix}ln2")
    h = F.gelu(h @ params[f"{prefix}fc1.w"] + params[f"{prefix}fc1.b"])
    return x + h @ params[f"{prefix}fc2.w"] + params[f"{prefix}fc2.b"]


@dataclass
class TransformerLanguageModelTask:
    """A small causal decoder-only transformer predicting the next character of ``text``: token and learned
    positional embeddings, ``layers`` pre-LN blocks (:func:`transformer_block`), a final layer norm and a read-out
    (the transposed token embedding when ``tied``, else its own matrix) plus a bias; cross-entropy averaged over
    the positions of a batch of windows.

    Args:
        train_text: Character ids the ``"train"`` batches are cut from.
        valid_text: Character ids of the ``"valid"`` batches (disjoint from ``train_text``).
        vocab: Number of character ids.
        d_model: Width of the residual stream.
        heads: Attention heads (``d_model`` must be a multiple).
        layers: Decoder blocks.
        ff: Width of each block's MLP.
        seq_len: Characters predicted per window (a window holds ``seq_len + 1``; the context is ``seq_len``).
        batch_size: Windows per minibatch.
        tied: Read out with the token embedding (weight tying) instead of a separate matrix.
    """

    train_text: Tensor = field(repr=False)
    valid_text: Tensor = field(repr=False)
    vocab: int
    d_model: int
    heads: int
    layers: int
    ff: int
    seq_len: int
    batch_size: int
    tied: bool = True
    name: str = "transformer_lm"

    def init(self, generator: torch.Generator) -> Params:
        """GPT-2's initialisation, with fan-in scaled projections for these small widths: embeddings and a
        separate read-out N(0, 0.02^2) (so the initial logits are small and the loss is about ``log(vocab)``),
        projections N(0, 1 / fan_in), the two that write into the residual stream further divided by
        ``sqrt(2 * layers)``; biases 0, layer-norm gains 1."""
        d, f = self.d_model, self.ff

        def normal(*shape: int, std: float) -> Tensor:
            return torch.randn(*shape, generator=generator) * std

        residual = 1 / math.sqrt(2 * self.layers)
        params: Params = {"embed": normal(self.vocab, d, std=0.02), "pos": normal(self.seq_len, d, std=0.02)}
        for i in range(self.layers):
            p = f"block{i}."
            params |= {
                f"{p}ln1.w": torch.ones(d),
                f"{p}ln1.b": torch.zeros(d),
                f"{p}qkv.w": normal(d, 3 * d, std=1 / math.sqrt(d)),
                f"{p}qkv.b": torch.zeros(3 * d),
                f"{p}proj.w": normal(d, d, std=residual / math.sqrt(d)),
                f"{p}proj.b": torch.zeros(d),
                f"{p}ln2.w": torch.ones(d),
                f"{p}ln2.b": torch.zeros(d),
                f"{p}fc1.w": normal(d, f, std=1 / math.sqrt(d)),
                f"{p}fc1.b": torch.zeros(f),
                f"{p}fc2.w": normal(f, d, std=residual / math.sqrt(f)),
                f"{p}fc2.b": torch.zeros(d),
            }
        params |= {"ln_f.w": torch.ones(d), "ln_f.b": torch.zeros(d)}
        if not self.tied:
            params["out.w"] = normal(d, self.vocab, std=0.02)
        params["out.b"] = torch.zeros(self.vocab)
        return params

    def sample_batch(self, generator: torch.Generator, split: str = "train") -> Batch:
        return _lm_batch(self, generator, split)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        (windows,) = batch
        inputs, targets = windows[:, :-1], windows[:, 1:]
        x = params["embed"][inputs] + params["pos"][: inputs.shape[1]]
        for i in range(self.layers):
            x = transformer_block(params, x, f"block{i}.", self.heads)
        x = _layer_norm(params, x, "ln_f")
        read_out = params["embed"].T if self.tied else params["out.w"]
        logits = x @ read_out + params["out.b"]
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))


class TransformerLanguageModelTaskFamily:
    """Character-level causal transformers; each task draws its own stretch of text from a corpus, exactly as
    :class:`GRULanguageModelTaskFamily` does (same corpora, same 7/8 : 1/8 split of a task's text, same 97-id
    vocabulary, so the loss at initialisation is about ``log(97)``).

    Args:
        corpus: ``"meta-train"`` or ``"held-aside"`` (disjoint help topics; see :func:`char_corpus`).
        d_model: Width of the residual stream.
        heads: Attention heads.
        layers: Decoder blocks.
        ff: Width of each block's MLP (default ``4 * d_model``).
        seq_len: Characters predicted per window (and the context length).
        batch_size: Windows per minibatch.
        task_chars: Characters of text per task.
        tied: Read out with the token embedding (weight tying).
    """

    name = "transformer_lm"

    def __init__(
        self,
        *,
        corpus: str = "meta-train",
        d_model: int = 32,
        heads: int = 2,
        layers: int = 1,
        ff: int | None = None,
        seq_len: int = 32,
        batch_size: int = 16,
        task_chars: int = 16384,
        tied: bool = True,
    ) -> None:
        if min(d_model, heads, layers) < 1 or d_model % heads:
            raise ValueError(
                f"d_model={d_model}, heads={heads} and layers={layers} must be >= 1 with d_model a multiple of heads"
            )
        if ff is not None and ff < 1:
            raise ValueError(f"ff={ff} must be >= 1 (or None for 4 * d_model)")
        self.text = _check_text_sizes(corpus, seq_len, batch_size, task_chars)
        self.corpus, self.d_model, self.heads, self.layers = corpus, d_model, heads, layers
        self.ff = 4 * d_model if ff is None else ff
        self.seq_len, self.batch_size, self.task_chars, self.tied = seq_len, batch_size, task_chars, tied

    def sample(self, generator: torch.Generator) -> TransformerLanguageModelTask:
        train_text, valid_text = _task_text(self.text, self.task_chars, generator)
        return TransformerLanguageModelTask(
            train_text,
            valid_text,
            len(CHAR_VOCAB) + 1,
            self.d_model,
            self.heads,
            self.layers,
            self.ff,
            self.seq_len,
            self.batch_size,
            self.tied,
            name=self.name,
        )


_FAMILIES: dict[str, Callable[..., TaskFamily]] = {
    "quadratic": QuadraticTaskFamily,
    "mlp": MLPTaskFamily,
    "teacher_student": TeacherStudentTaskFamily,
    "conv": ConvTaskFamily,
    "gru_lm": GRULanguageModelTaskFamily,
    "transformer_lm": TransformerLanguageModelTaskFamily,
}


def _family_class(name: str) -> Callable[..., TaskFamily]:
    if name == "omniglot":
        from lightning_meta.optim.meta.omniglot import OmniglotTaskFamily

        return OmniglotTaskFamily
    if name not in _FAMILIES:
        raise ValueError(f"task family {name!r} is unknown; choose one of {list(family_names())}")
    return _FAMILIES[name]


def family_names() -> tuple[str, ...]:
    """The names :func:`get_family` builds, sorted."""
    return tuple(sorted([*_FAMILIES, "omniglot"]))


def family_parameters(name: str) -> tuple[str, ...]:
    """The keyword arguments the family ``name`` takes (what ``get_family(name, **kwargs)`` accepts), sorted."""
    return tuple(sorted(signature(_family_class(name)).parameters))


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Builds a task family by name: ``quadratic``, ``mlp``, ``teacher_student``, ``conv``, ``gru_lm``,
    ``transformer_lm`` or ``omniglot``. An argument the family does not take is refused with the ones it does."""
    cls = _family_class(name)
    unknown = sorted(set(kwargs) - set(family_parameters(name)))
    if unknown:
        raise ValueError(
            f"task family {name!r} takes no argument {', '.join(map(repr, unknown))}; "
            f"it takes {', '.join(family_parameters(name))}"
        )
    return cls(**kwargs)
