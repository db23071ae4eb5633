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
regression, small convnets on synthetic template images, character-level GRU language models on
English text that ships with Python, and (when the shared data is present) Omniglot characters at low
resolution (:mod:`lightning_meta.optim.meta.omniglot`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
    "get_family",
    "sample_batches",
    "stack_params",
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

    Args:
        in_features: Input dimension.
        hidden: Hidden widths.
        classes: Number of classes.
        batch_size: Examples per minibatch.
        activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
        noise: Within-class standard deviation (class means are standard normal).
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
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        if classes < 2:
            raise ValueError(f"classes={classes} must be at least 2")
        self.sizes = (in_features, *hidden, classes)
        self.batch_size, self.activation, self.noise = batch_size, activation, noise

    def sample(self, generator: torch.Generator) -> MLPTask:
        means = torch.randn(self.sizes[-1], self.sizes[0], generator=generator)
        sampler = _MixtureSampler(means, self.batch_size, self.noise)
        return MLPTask(self.sizes, self.activation, False, sampler, name=self.name)


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

    Args:
        in_features: Input dimension.
        teacher_hidden: Hidden widths of the teacher.
        hidden: Hidden widths of the student.
        batch_size: Examples per minibatch.
        activation: The student's activation.
        noise: Label noise standard deviation.
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
    ) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.in_features, self.teacher_sizes = in_features, (in_features, *teacher_hidden, 1)
        self.sizes = (in_features, *hidden, 1)
        self.batch_size, self.activation, self.noise = batch_size, activation, noise

    def sample(self, generator: torch.Generator) -> MLPTask:
        teacher = _dense_init(generator, self.teacher_sizes)
        for i in range(len(self.teacher_sizes) - 1):  # non-zero biases make the target less symmetric
            teacher[f"b{i}"] = 0.5 * torch.randn(teacher[f"b{i}"].shape, generator=generator)
        sampler = _TeacherSampler(teacher, len(self.teacher_sizes) - 1, self.batch_size, self.in_features, self.noise)
        return MLPTask(self.sizes, self.activation, True, sampler, name=self.name)


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
        _check_split(split)
        text = self.train_text if split == "train" else self.valid_text
        starts = torch.randint(len(text) - self.seq_len, (self.batch_size,), generator=generator)
        return (text[starts[:, None] + torch.arange(self.seq_len + 1)],)  # (batch, seq_len + 1)

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
        if min(embed, hidden, seq_len, batch_size) < 1:
            raise ValueError(
                f"embed={embed}, hidden={hidden}, seq_len={seq_len} and batch_size={batch_size} must be >= 1"
            )
        if task_chars < 16 * (seq_len + 1):
            raise ValueError(f"task_chars={task_chars} must be at least 16 * (seq_len + 1) = {16 * (seq_len + 1)}")
        self.text = char_corpus(corpus)
        if task_chars > len(self.text):
            raise ValueError(f"task_chars={task_chars} exceeds the {len(self.text)} characters of corpus {corpus!r}")
        self.corpus, self.embed, self.hidden, self.seq_len = corpus, embed, hidden, seq_len
        self.batch_size, self.task_chars = batch_size, task_chars

    def sample(self, generator: torch.Generator) -> GRULanguageModelTask:
        start = int(torch.randint(len(self.text) - self.task_chars + 1, (), generator=generator))
        text = self.text[start : start + self.task_chars]
        cut = self.task_chars * 7 // 8
        return GRULanguageModelTask(
            text[:cut],
            text[cut:],
            len(CHAR_VOCAB) + 1,
            self.embed,
            self.hidden,
            self.seq_len,
            self.batch_size,
            name=self.name,
        )


_FAMILIES = {
    "quadratic": QuadraticTaskFamily,
    "mlp": MLPTaskFamily,
    "teacher_student": TeacherStudentTaskFamily,
    "conv": ConvTaskFamily,
    "gru_lm": GRULanguageModelTaskFamily,
}


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """Builds a task family by name: ``quadratic``, ``mlp``, ``teacher_student``, ``conv``, ``gru_lm`` or
    ``omniglot``."""
    if name == "omniglot":
        from lightning_meta.optim.meta.omniglot import OmniglotTaskFamily

        return OmniglotTaskFamily(**kwargs)
    if name not in _FAMILIES:
        raise ValueError(f"task family {name!r} is unknown; choose one of {sorted([*_FAMILIES, 'omniglot'])}")
    return _FAMILIES[name](**kwargs)
