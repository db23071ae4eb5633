"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) few-shot episodes.

Splits: the Vinyals et al. (NeurIPS 2016, arXiv:1606.04080) split of 1028/172/423 characters with
rotations as classes (the Prototypical Networks protocol, arXiv:1703.05175), Lake's
background/evaluation split, the MAML split (Finn et al. 2017, arXiv:1703.03400: seeded shuffle,
1100/100/rest characters), a seeded split by character, and user split files.

Images are read straight from the official zips (or extracted folders of the same layout, or
torchvision's ``omniglot-py/`` folder), resized to ``image_size`` with LANCZOS, inverted so that
strokes are 1, decoded once and cached. Departures: the MAML split shuffles a sorted character
list with ``random.Random(1)`` (the original shuffles ``os.listdir`` order, which is not
reproducible), and with ``rotations=True`` rotations are new classes for every split instead of
the original per-episode random rotation.
"""

from __future__ import annotations

import functools
import io
import random
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_meta.datamodules.episodic import EpisodicDataModule
from lightning_meta.datamodules.hierarchy import ClassHierarchy
from lightning_meta.datamodules.store import ClassStore, cached_store
from lightning_meta.datamodules.variable import VariableEpisodes
from lightning_meta.progress import progress

__all__ = ["OmniglotDataModule", "parse_split_file", "seeded_split"]

URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718", "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
SOURCES = ("images_background", "images_evaluation", "images_background_small1", "images_background_small2")
SPLITS_DIR = Path(__file__).parent / "splits"
VINYALS_COUNTS = {"train": 1028, "val": 172, "test": 423}
ROTATIONS = (0, 90, 180, 270)


def parse_split_file(path: str | Path) -> list[tuple[str, str | None, int | None]]:
    """Read a split file: one ``Alphabet``, ``Alphabet/characterNN`` or ``Alphabet/characterNN/rotDDD`` per line.

    Blank lines and ``#`` comments are skipped. Returns ``(alphabet, character or None, rotation or None)``.
    """
    out = []
    for k, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.strip("/").split("/")
        rot = None
        if len(parts) == 3:
            if not (parts[2].startswith("rot") and parts[2][3:].isdigit() and int(parts[2][3:]) in ROTATIONS):
                raise ValueError(
                    f"{path}:{k}: {line!r} has rotation {parts[2]!r}; expected rot000/rot090/rot180/rot270"
                )
            rot = int(parts[2][3:])
        elif len(parts) > 3:
            raise ValueError(f"{path}:{k}: {line!r} is not Alphabet[/characterNN[/rotDDD]]")
        out.append((parts[0], parts[1] if len(parts) > 1 else None, rot))
    return out


def seeded_split(items: Sequence[str], fractions: Sequence[float], seed: int) -> tuple[list[str], list[str], list[str]]:
    """Shuffle sorted ``items`` with ``random.Random(seed)`` and cut them by ``fractions`` (train, val, test).

    Every part gets at least one item; the test part takes the remainder.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions):
        raise ValueError(f"split_fractions={tuple(fractions)} must be three positive fractions (train, val, test)")
    if len(items) < 3:
        raise ValueError(f"a seeded split needs at least 3 classes, got {len(items)}")
    order = sorted(items)
    random.Random(seed).shuffle(order)
    total = sum(fractions)
    n_train = max(1, round(len(order) * fractions[0] / total))
    n_val = max(1, round(len(order) * fractions[1] / total))
    n_train = min(n_train, len(order) - 2)
    n_val = min(n_val, len(order) - n_train - 1)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot episodes (1 x ``image_size`` x ``image_size``, strokes = 1).

    Args:
        root: folder holding ``images_background.zip`` and ``images_evaluation.zip`` (or the small
            subsets ``images_background_small{1,2}.zip``, extracted folders of those names, or
            torchvision's ``omniglot-py/``). It is only read; decoded images go to ``cache_dir``.
        split: ``"vinyals"`` (shipped lists; needs background + evaluation), ``"lake"`` (train/val
            from background by a seeded character split, test = evaluation), ``"maml"``
            (1100/100/rest characters, seeded), ``"seeded"`` (by character, ``split_fractions``),
            ``"alphabets"`` (seeded by whole alphabets, ``split_fractions`` of the alphabets: no alphabet in two
            splits, as Meta-Dataset and ``alphabet_episodes`` want),
            ``"custom"`` (``split_dir`` with ``train.txt``, ``val.txt``, ``test.txt``) or ``"auto"``
            (``"vinyals"`` when the full data is present, else ``"seeded"``).
        fallback_split: the split to use instead when ``split`` is ``"vinyals"``, ``"lake"`` or ``"maml"`` and
            ``root`` holds only part of Omniglot (e.g. the small background subsets): ``"seeded"``,
            ``"alphabets"`` or ``"custom"``; the switch is logged. ``None`` (default) raises instead. The example configs set
            ``"seeded"`` so that they run on whatever Omniglot files are at hand; figures from such a run are not
            comparable with the papers'.
        split_dir: folder of split files for ``split="custom"`` (see :func:`parse_split_file`).
        split_fractions: train/val/test fractions of characters for ``"seeded"``, of alphabets for
            ``"alphabets"`` (and the train/val proportion of background characters for ``"lake"``).
        split_seed: seed of the seeded splits (``"maml"`` uses 1, as the original).
        rotations: 90/180/270 degree rotations of each character as new classes.
        image_size: side of the resized images (105 keeps the originals).
        download: download the official zips into ``root`` if missing (rank zero, md5 checked). Without
            network access the error names the URLs and where to put the files by hand.
        alphabet_episodes: with ``variable_episodes``, draw each episode's characters from one alphabet (one
            rotation of it with ``rotations=True``), as Meta-Dataset does for Omniglot
            (:class:`~lightning_meta.datamodules.ClassHierarchy`). Every alphabet of a split then needs at least
            ``min_ways`` of its characters in that split (else setup raises, naming the alphabets): splits by
            character (``"seeded"``, ``"maml"``) scatter alphabets; ``split="alphabets"`` and ``"custom"`` files
            listing whole alphabets keep them together.
        ways: see :class:`~lightning_meta.datamodules.episodic.EpisodicDataModule` for this and the rest.
    """

    def __init__(
        self,
        root: str,
        *,
        split: str = "auto",
        split_dir: str | None = None,
        fallback_split: str | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        rotations: bool = True,
        image_size: int = 28,
        download: bool = False,
        alphabet_episodes: bool = False,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        tasks_per_batch: int = 32,
        train_episodes: int = 3200,
        val_episodes: int = 640,
        test_episodes: int = 600,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        pin_memory: bool = False,
        variable_episodes: VariableEpisodes | None = None,
    ) -> None:
        super().__init__(
            ways=ways,
            shots=shots,
            queries=queries,
            tasks_per_batch=tasks_per_batch,
            train_episodes=train_episodes,
            val_episodes=val_episodes,
            test_episodes=test_episodes,
            eval_ways=eval_ways,
            eval_shots=eval_shots,
            eval_queries=eval_queries,
            seed=seed,
            num_workers=num_workers,
            cache_dir=cache_dir,
            pin_memory=pin_memory,
            variable_episodes=variable_episodes,
        )
        if split not in ("auto", "vinyals", "lake", "maml", "seeded", "alphabets", "custom"):
            raise ValueError(
                f"split={split!r}; use 'auto', 'vinyals', 'lake', 'maml', 'seeded', 'alphabets' or 'custom'"
            )
        if fallback_split not in (None, "seeded", "alphabets", "custom"):
            raise ValueError(f"fallback_split={fallback_split!r}; use None (raise), 'seeded', 'alphabets' or 'custom'")
        if (split == "custom" or fallback_split == "custom") and split_dir is None:
            raise ValueError("split='custom' needs split_dir, a folder with train.txt, val.txt and test.txt")
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be positive")
        seeded_split([str(i) for i in range(3)], split_fractions, 0)  # validates the fractions
        self.root = Path(root).expanduser()
        self.split, self.split_dir, self.fallback_split = split, split_dir, fallback_split
        self.split_fractions, self.split_seed = tuple(split_fractions), split_seed
        self.rotations, self.image_size, self.download = rotations, image_size, download
        self.alphabet_episodes = alphabet_episodes
        self.save_hyperparameters()

    @override
    def prepare_data(self) -> None:
        """Download if asked (md5-checked), then decode into the cache once (local rank zero only)."""
        if self.download:
            from torchvision.datasets.utils import check_integrity, download_url

            for name, md5 in MD5.items():
                path = self.root / f"{name}.zip"
                if not check_integrity(str(path), md5):
                    try:
                        download_url(f"{URL}/{name}.zip", str(self.root), f"{name}.zip", md5)
                    except OSError as err:  # URLError, timeouts, refused connections: no network
                        raise RuntimeError(_manual_download_hint(self.root, err)) from err
        self.characters()

    def find_sources(self) -> dict[str, Path]:
        """The Omniglot zips/folders under ``root``, by name (zips preferred over extracted folders).

        Raises:
            FileNotFoundError: saying where the files go and how to get them.
        """
        found: dict[str, Path] = {}
        for base in (self.root, self.root / "omniglot-py"):
            for name in SOURCES:
                for cand in (base / f"{name}.zip", base / name):
                    if name not in found and cand.exists():
                        found[name] = cand
        if not found:
            raise FileNotFoundError(
                f"no Omniglot data in {self.root}: expected images_background.zip and images_evaluation.zip "
                f"(or images_background_small1/2.zip, extracted folders of those names, or torchvision's "
                f"omniglot-py/ folder) directly under root. Pass download=True, or get them from {URL}/"
            )
        return found

    def characters(self) -> tuple[ClassStore, dict[str, str]]:
        """All characters (deduplicated by ``Alphabet/characterNN``) and the source name of each."""
        stores, origin = [], {}
        for name, path in self.find_sources().items():
            store = cached_store(
                f"omniglot-{name}-{self.image_size}",
                [path],
                functools.partial(_decode, path, self.image_size),
                self.cache_dir,
            )
            keep = [c for c in store.class_names if c not in origin]
            for c in keep:
                origin[c] = name
            if keep:
                stores.append(store.select(keep) if len(keep) < store.num_classes else store)
        return ClassStore.concat(stores), origin

    def split_characters(self, chars: list[str], origin: dict[str, str]) -> dict[str, list[tuple[str, int | None]]]:
        """Resolve ``self.split`` to ``(character, rotation or None)`` lists per split."""
        full = {"images_background", "images_evaluation"} <= set(origin.values())
        split = self.split if self.split != "auto" else ("vinyals" if full else "seeded")
        if self.split == "auto":
            rank_zero_info(f"OmniglotDataModule: split='auto' uses split={split!r} ({len(chars)} characters found)")
        if split in ("vinyals", "lake", "maml") and not full and self.fallback_split is not None:
            rank_zero_info(
                f"OmniglotDataModule: split={split!r} needs images_background and images_evaluation, but {self.root} "
                f"holds {sorted(set(origin.values()))}; using fallback_split={self.fallback_split!r} on its "
                f"{len(chars)} characters instead (not the published protocol)"
            )
            split = self.fallback_split
        if split in ("vinyals", "lake", "maml") and not full:
            raise ValueError(
                f"split={split!r} needs images_background and images_evaluation in {self.root}, found only "
                f"{sorted(set(origin.values()))}; pass download=True, use split='seeded', or set "
                f"fallback_split='seeded' to fall back to it when the full data is missing"
            )
        if split in ("vinyals", "custom"):
            folder = (
                SPLITS_DIR / "omniglot_vinyals" if split == "vinyals" else Path(cast(str, self.split_dir))
            )  # __init__ checked it
            out = {s: _resolve(folder / f"{s}.txt", chars) for s in ("train", "val", "test")}
            if split == "vinyals":
                got = {s: len({c for c, _ in v}) for s, v in out.items()}
                if got != VINYALS_COUNTS:
                    raise ValueError(f"Vinyals split resolved to {got} characters, expected {VINYALS_COUNTS}")
            used = {c for v in out.values() for c, _ in v}
            if len(used) < len(chars):
                rank_zero_warn(f"{len(chars) - len(used)} characters are in no split file and are not used")
            return out
        if split == "lake":
            bg = [c for c in chars if origin[c] == "images_background"]
            order = sorted(bg)
            random.Random(self.split_seed).shuffle(order)
            n_val = max(1, round(len(order) * self.split_fractions[1] / sum(self.split_fractions[:2])))
            te = [c for c in chars if origin[c] == "images_evaluation"]
            parts = (order[n_val:], order[:n_val], te)
        elif split == "maml":
            if len(chars) < 1201:
                raise ValueError(
                    f"split='maml' takes 1100 train / 100 val / the rest test characters, "
                    f"but {self.root} has {len(chars)}; use the full Omniglot or split='seeded'"
                )
            order = sorted(chars)
            random.Random(1).shuffle(order)
            parts = (order[:1100], order[1100:1200], order[1200:])
        elif split == "alphabets":
            alphabets = sorted({c.split("/")[0] for c in chars})
            if len(alphabets) < 3:
                raise ValueError(
                    f"split='alphabets' needs at least 3 alphabets (train, val, test), {self.root} has "
                    f"{len(alphabets)}: {alphabets}; use split='seeded' (by character)"
                )
            part_of = {
                a: k for k, p in enumerate(seeded_split(alphabets, self.split_fractions, self.split_seed)) for a in p
            }
            parts = ([], [], [])
            for c in chars:
                parts[part_of[c.split("/")[0]]].append(c)
        else:
            parts = seeded_split(chars, self.split_fractions, self.split_seed)
        return {s: [(c, None) for c in p] for s, p in zip(("train", "val", "test"), parts)}

    @override
    def class_hierarchy(self, split: str, store: ClassStore) -> ClassHierarchy | None:
        if not self.alphabet_episodes:
            return None
        # "Alphabet/characterNN" or "Alphabet/characterNN/rotDDD": a rotated alphabet is an alphabet of its own
        return ClassHierarchy.group_by(store.class_names, lambda c: "/".join(c.split("/")[::2]))

    @override
    def build_stores(self) -> dict[str, ClassStore]:
        store, origin = self.characters()
        plan = self.split_characters(store.class_names, origin)
        return {s: _rotated(store, entries, self.rotations) for s, entries in plan.items()}


def _manual_download_hint(root: Path, err: BaseException) -> str:
    urls = "\n".join(f"  {URL}/{name}.zip  (md5 {md5})" for name, md5 in MD5.items())
    return (
        f"downloading Omniglot failed ({type(err).__name__}: {err}); without network access, fetch these files "
        f"elsewhere:\n{urls}\nand place them, unextracted, in {root.resolve()}/ (then download=False is enough). "
        f"The two small background subsets images_background_small1.zip / images_background_small2.zip from the same "
        f"folder also work, with split='seeded' (or fallback_split='seeded')."
    )


def _resolve(path: Path, chars: Sequence[str]) -> list[tuple[str, int | None]]:
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found; a split folder needs train.txt, val.txt and test.txt")
    by_alphabet: dict[str, list[str]] = {}
    for c in chars:
        by_alphabet.setdefault(c.split("/")[0], []).append(c)
    out, unknown = [], []
    for alphabet, char, rot in parse_split_file(path):
        if char is None:
            if alphabet not in by_alphabet:
                unknown.append(alphabet)
            out += [(c, rot) for c in by_alphabet.get(alphabet, [])]
        elif f"{alphabet}/{char}" in by_alphabet.get(alphabet, []) or f"{alphabet}/{char}" in chars:
            out.append((f"{alphabet}/{char}", rot))
        else:
            unknown.append(f"{alphabet}/{char}")
    if unknown:
        raise ValueError(
            f"split file {path} names {len(unknown)} alphabets/characters that are not in the data, e.g. "
            f"{unknown[:5]}; check that root holds the matching Omniglot files or fix the split file"
        )
    return list(dict.fromkeys(out))


def _rotated(store: ClassStore, entries: list[tuple[str, int | None]], rotations: bool) -> ClassStore:
    """The split's classes: ``Alphabet/characterNN`` (no rotations) or ``.../rotDDD`` rotated copies."""
    if (not rotations and all(r is None for _, r in entries)) or not entries:  # an empty split stays empty
        return store.select([c for c, _ in entries])
    by_rot: dict[int, list[str]] = {}
    for c, r in entries:
        for angle in (ROTATIONS if rotations else (0,)) if r is None else (r,):
            by_rot.setdefault(angle, []).append(c)
    parts = []
    for angle in sorted(by_rot):
        s = store.select(by_rot[angle])
        k = angle // 90
        imgs = torch.rot90(s.images, k, dims=(-2, -1)).contiguous() if k else s.images
        parts.append(ClassStore(imgs, s.offsets, [f"{c}/rot{angle:03d}" for c in s.class_names]))
    return ClassStore.concat(parts)


def _decode(path: Path, size: int) -> ClassStore:
    """Decode every ``Alphabet/characterNN/*.png`` of a zip or folder into uint8 (1, size, size), strokes = 255."""
    from PIL import Image

    def load(data: bytes) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, size, size)
        return 255 - x

    labels, images = [], []
    hint = f"it should hold <Alphabet>/<characterNN>/<drawing>.png; delete it and re-download from {URL}/"
    if path.is_dir():
        files = sorted(path.rglob("*.png"))
        members = [(f.relative_to(path).parts, f) for f in files]
        for parts, f in progress(members, f"decoding {path.name}"):
            if len(parts) < 3:
                raise ValueError(f"Omniglot folder {path} is malformed at {f}; {hint}")
            labels.append(f"{parts[-3]}/{parts[-2]}")
            images.append(load(f.read_bytes()))
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
                for n in progress(names, f"decoding {path.name}"):
                    member = n.strip("/").split("/")
                    if len(member) < 3:
                        raise ValueError(f"Omniglot zip {path} is malformed at member {n}; {hint}")
                    labels.append(f"{member[-3]}/{member[-2]}")
                    images.append(load(zf.read(n)))
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            raise ValueError(f"{path} is not a readable zip ({err}): corrupt or partial download; {hint}") from err
    if not images:
        raise ValueError(f"no PNG images found in {path}; {hint}")
    return ClassStore.from_labeled(torch.stack(images), labels)
