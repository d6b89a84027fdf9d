"""Oxford Flowers-102 (Nilsback & Zisserman, 2008) from the official files.

Expected in ``data_dir`` (from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/):

- ``102flowers.tgz``: ``jpg/image_00001.jpg`` ... ``jpg/image_08189.jpg``
- ``imagelabels.mat``: ``labels`` [1, 8189], classes 1..102
- ``setid.mat``: ``trnid`` / ``valid`` / ``tstid``, 1-based image ids of the official
  train / validation / test splits
- optional ``102segmentations.tgz``: ``segmim/segmim_00001.jpg`` ..., each the image with
  its background painted blue (0, 0, 254); the flower mask is every pixel that is not
  (near-)blue, with a tolerance for JPEG noise.

Images are read from the archive by member name; nothing is extracted to disk.

With segmentations, an image whose segmentation is missing from the archive gets
``mask = None`` and a warning: ``hygiene.check_images`` then drops it and lists it in
data_report.json ("no mask"), so every image that reaches training and analysis has a
mask.

Use the builder directly::

    builder = Oxford102(data_dir="~/data/flowers102", cache_dir=...)
    builder.download_and_prepare()
    ds = builder.as_dataset()  # DatasetDict: train / validation / test
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from typing import Iterator, Optional

import datasets
import numpy as np
import scipy.io
from PIL import Image, ImageOps

from .errors import MissingFileError, UserError

logger = logging.getLogger(__name__)

OXFORD102_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
IMAGES_ARCHIVE = "102flowers.tgz"
LABELS_FILE = "imagelabels.mat"
SPLITS_FILE = "setid.mat"
SEGMENTATIONS_ARCHIVE = "102segmentations.tgz"
# setid.mat key -> split name.
SPLIT_KEYS = {"trnid": "train", "valid": "validation", "tstid": "test"}
# Background colour of the segmentation images, and how far (Euclidean, 0..255 units)
# a JPEG-compressed pixel may stray from it and still count as background.
SEGMENTATION_BLUE = (0, 0, 254)
SEGMENTATION_TOLERANCE = 100.0

# The class names used by the community (jimgoo/caffe-oxford102, TFDS), label 1 first;
# kept verbatim except "pink-yellow dahlia?" -> "pink-yellow dahlia" and stray spaces.
OXFORD102_CLASS_NAMES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle",
    "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily",
    "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose",
    "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia",
    "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush", "californian poppy",
    "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy",
    "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)  # fmt: skip
assert len(OXFORD102_CLASS_NAMES) == 102, "Oxford-102 has 102 classes"
assert len(set(OXFORD102_CLASS_NAMES)) == 102, "class names must be unique"

_IMAGE_MEMBER = re.compile(r"(?:^|/)image_(\d+)\.jpg$")
_SEGMENTATION_MEMBER = re.compile(r"(?:^|/)segmim_(\d+)\.jpg$")


def _require_file(data_dir: str, name: str) -> str:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise MissingFileError(
            f"Oxford-102 file {name} not found in {data_dir}. Download it from {OXFORD102_URL} "
            f"into that folder (needed: {IMAGES_ARCHIVE}, {LABELS_FILE}, {SPLITS_FILE}; optional: "
            f"{SEGMENTATIONS_ARCHIVE})."
        )
    return path


def _load_mat_vector(path: str, key: str) -> np.ndarray:
    """A 1-D int64 vector stored under ``key`` in a .mat file."""
    content = scipy.io.loadmat(path)
    if key not in content:
        keys = sorted(k for k in content if not k.startswith("__"))
        raise UserError(
            f"{os.path.basename(path)} has no '{key}' entry (found {keys}); re-download it from {OXFORD102_URL}."
        )
    return np.asarray(content[key]).reshape(-1).astype(np.int64)


def read_labels_and_splits(data_dir: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read imagelabels.mat and setid.mat.

    Args:
        data_dir: folder with the official files.

    Returns:
        ``(labels, splits)``: labels int64 [num_images], 0-based classes (index = image
        id - 1); splits {split name: 1-based image ids int64 [n]}.
    """
    labels = _load_mat_vector(_require_file(data_dir, LABELS_FILE), "labels")
    if labels.size == 0 or labels.min() < 1 or labels.max() > len(OXFORD102_CLASS_NAMES):
        raise UserError(f"{LABELS_FILE}: labels must be in 1..102, got {labels.min()}..{labels.max()}.")
    splits_path = _require_file(data_dir, SPLITS_FILE)
    splits = {}
    for key, split in SPLIT_KEYS.items():
        ids = _load_mat_vector(splits_path, key)
        if ids.size and (ids.min() < 1 or ids.max() > labels.size):
            raise UserError(
                f"{SPLITS_FILE}: '{key}' holds image ids outside 1..{labels.size} (the number of labels in "
                f"{LABELS_FILE}); the two files do not belong together."
            )
        splits[split] = ids
    return labels - 1, splits


def segmentation_to_mask(segmentation: Image.Image) -> Image.Image:
    """Flower mask from an Oxford-102 segmentation image (background painted blue).

    Args:
        segmentation: the segmim image.

    Returns:
        "L" mask of the same size, 255 = flower (every pixel not near SEGMENTATION_BLUE).
    """
    rgb = np.asarray(segmentation.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    distance = np.linalg.norm(rgb - np.asarray(SEGMENTATION_BLUE, dtype=np.float32), axis=-1)  # [H, W]
    flower = distance > SEGMENTATION_TOLERANCE
    return Image.fromarray(flower.astype(np.uint8) * 255, mode="L")


def _iter_archive(path: str, pattern: re.Pattern) -> Iterator[tuple[int, str, bytes]]:
    """Stream ``(image id, member name, bytes)`` of the members whose name matches ``pattern``."""
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            match = pattern.search(member.name)
            if not member.isfile() or match is None:
                continue
            handle = archive.extractfile(member)
            assert handle is not None, "regular tar members can be read"
            yield int(match.group(1)), member.name, handle.read()


def _file_signature(path: str) -> list:
    stat = os.stat(path)
    return [os.path.basename(path), stat.st_size, int(stat.st_mtime)]


@dataclasses.dataclass
class Oxford102Config(datasets.BuilderConfig):
    """Oxford-102 configuration: ``data_dir`` holds the official files."""

    name: str = "oxford102"


class Oxford102(datasets.GeneratorBasedBuilder):
    """``datasets`` builder of Oxford Flowers-102 from the official files; use it directly."""

    BUILDER_CONFIG_CLASS = Oxford102Config
    VERSION = datasets.Version("1.0.0")

    def __init__(self, data_dir: str, cache_dir: Optional[str] = None, **kwargs) -> None:
        """Create the builder; checks that the required files exist.

        Args:
            data_dir: folder with 102flowers.tgz, imagelabels.mat, setid.mat (and optionally
                102segmentations.tgz).
            cache_dir: datasets cache folder (default: the datasets cache).
            **kwargs: passed to datasets.GeneratorBasedBuilder.

        Raises:
            FileNotFoundError: a required file is missing (says where to get it).
        """
        data_dir = os.path.abspath(os.path.expanduser(data_dir))
        if not os.path.isdir(data_dir):
            raise MissingFileError(
                f"Oxford-102 folder {data_dir} does not exist; download the files from {OXFORD102_URL} into it."
            )
        files = [_require_file(data_dir, name) for name in (IMAGES_ARCHIVE, LABELS_FILE, SPLITS_FILE)]
        self.has_segmentations = os.path.isfile(os.path.join(data_dir, SEGMENTATIONS_ARCHIVE))
        if self.has_segmentations:
            files.append(os.path.join(data_dir, SEGMENTATIONS_ARCHIVE))
        else:
            logger.info("%s not in %s: Oxford-102 without masks.", SEGMENTATIONS_ARCHIVE, data_dir)
        # Cache key: the folder and the size / mtime of each file, so replaced files are re-read.
        blob = json.dumps({"data_dir": data_dir, "files": [_file_signature(f) for f in files]})
        config_id = "oxford102-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        super().__init__(cache_dir=cache_dir, data_dir=data_dir, config_id=config_id, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        features = {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(OXFORD102_CLASS_NAMES)),
        }
        if self.has_segmentations:
            features["mask"] = datasets.Image()
        return datasets.DatasetInfo(
            description="Oxford Flowers-102 (Nilsback & Zisserman, 2008), official splits.",
            homepage=OXFORD102_URL,
            features=datasets.Features(features),
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        data_dir = self.config.data_dir
        labels, splits = read_labels_and_splits(data_dir)
        images_path = os.path.join(data_dir, IMAGES_ARCHIVE)
        with tarfile.open(images_path, "r:*") as archive:
            present = {int(m.group(1)) for m in map(_IMAGE_MEMBER.search, archive.getnames()) if m}
        listed = sorted(set(np.concatenate(list(splits.values())).tolist()))
        missing = [i for i in listed if i not in present]
        if missing:
            names = ", ".join(f"jpg/image_{i:05d}.jpg" for i in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise MissingFileError(
                f"{len(missing)} image(s) listed in {SPLITS_FILE} are missing from {IMAGES_ARCHIVE}: {names}{more}. "
                f"Re-download {IMAGES_ARCHIVE} from {OXFORD102_URL}."
            )
        return [
            datasets.SplitGenerator(
                name=split,
                gen_kwargs={"image_ids": splits[split].tolist(), "labels": labels, "data_dir": data_dir},
            )
            for split in SPLIT_KEYS.values()
        ]

    def _read_masks(self, data_dir: str, wanted: set[int]) -> dict[int, bytes]:
        """PNG-encoded masks of the ``wanted`` image ids found in the segmentation archive."""
        masks = {}
        for image_id, _, data in _iter_archive(os.path.join(data_dir, SEGMENTATIONS_ARCHIVE), _SEGMENTATION_MEMBER):
            if image_id in wanted:
                buffer = io.BytesIO()
                # upright, as datasets decodes the image itself (EXIF orientation applied)
                segmentation = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
                segmentation_to_mask(segmentation).save(buffer, format="PNG")
                masks[image_id] = buffer.getvalue()
        missing = len(wanted) - len(masks)
        if missing:
            logger.warning(
                "%d image(s) have no segmentation in %s; they get mask=None and are skipped by the image check.",
                missing,
                SEGMENTATIONS_ARCHIVE,
            )
        return masks

    def _generate_examples(self, image_ids: list[int], labels: np.ndarray, data_dir: str):
        wanted = set(image_ids)
        masks = self._read_masks(data_dir, wanted) if self.has_segmentations else {}
        for image_id, name, data in _iter_archive(os.path.join(data_dir, IMAGES_ARCHIVE), _IMAGE_MEMBER):
            if image_id not in wanted:
                continue
            example = {"image": {"bytes": data, "path": name}, "label": int(labels[image_id - 1])}
            if self.has_segmentations:
                mask = masks.get(image_id)
                example["mask"] = None if mask is None else {"bytes": mask, "path": None}
            yield image_id, example
