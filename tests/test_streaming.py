"""Sets larger than memory: protect on an image source read batch by batch (honeypotnet.data.source) gives
exactly what it gives on the same images as a tensor, and never holds the whole set at once."""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from honeypotnet.config import ProtectConfig
from honeypotnet.data import (ConcatSource, DatasetSource, FileSource, ImageSource, as_images, concat, is_lazy,
                              load_dataset)
from honeypotnet.models import create_model
from honeypotnet.ops import batched_forward, take
from honeypotnet.protect import protect
from honeypotnet.state import STATE_FILE

SPEC = partial(ProtectConfig.preset, "spec")
N_SHADOW, N_OWNER = 600, 120  # more shadow images than one feature batch (500)


def write_pngs(images: torch.Tensor, folder, labels=None) -> None:
    """Lossless files of uint8 images (N,3,H,W): folder/<i>.png, or folder/c<label>/<i>.png."""
    for i, x in enumerate(images):
        d = folder if labels is None else folder / f"c{int(labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(d / f"{i:05d}.png")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A flat folder of shadow images and an ImageFolder tree of labelled owner images, 32 px PNGs written
    from the embedded data, and those images as tensors."""
    root = tmp_path_factory.mktemp("streamed")
    shadow = load_dataset("shapes", split="shadow", n=N_SHADOW).images
    owner = load_dataset("shapes", split="train", n=N_OWNER)
    owner = owner.subset(torch.argsort(owner.labels, stable=True))  # in ImageFolder's order (class by class)
    write_pngs(shadow, root / "shadow")
    write_pngs(owner.images, root / "owner", owner.labels)
    return root, shadow, owner


def test_a_file_source_decodes_only_what_is_asked_and_matches_the_in_memory_loader(image_files):
    root, shadow, owner = image_files
    src = load_dataset("folder", root / "shadow", None, lazy=True)
    assert isinstance(src, FileSource) and is_lazy(src) and src.decoded == 0
    assert src.shape == (N_SHADOW, 3, 32, 32) and src.nbytes == shadow.numel()
    assert src.decoded <= 1  # the image size, from the first file
    idx = torch.tensor([5, 0, 599, 5])
    assert torch.equal(src[idx], shadow[idx]) and torch.equal(src[10:13], shadow[10:13])
    assert torch.equal(src[torch.arange(N_SHADOW) % 97 == 0], shadow[torch.arange(N_SHADOW) % 97 == 0])
    view = take(src, slice(0, 50)).take(torch.tensor([3, 1]))  # views decode nothing
    before = src.decoded
    assert len(view) == 2 and src.decoded == before
    assert torch.equal(view[:], shadow[[3, 1]])
    labelled = load_dataset("imagefolder", root / "owner", None, lazy=True)
    assert torch.equal(labelled.labels, owner.labels) and labelled.classes == [f"c{i}" for i in range(10)]
    sub = labelled.subset(torch.tensor([4, 2]))
    assert torch.equal(sub.labels, owner.labels[[4, 2]]) and torch.equal(sub.images[:], owner.images[[4, 2]])
    # sequential passes in DataLoader worker processes read the very same batches
    src.workers = 2
    assert torch.equal(torch.cat(list(src.batches(256))), shadow)
    src.workers = 0
    # the shadow and owner sets as one, and a resize on the way
    both = concat(src, labelled)
    assert isinstance(both, ConcatSource) and both.shape == (N_SHADOW + N_OWNER, 3, 32, 32) and both.labels is None
    assert torch.equal(both[torch.tensor([599, 600, 0])], torch.stack([shadow[599], owner.images[0], shadow[0]]))
    small = load_dataset("folder", root / "shadow", None, size=16, lazy=True)
    assert small.shape == (N_SHADOW, 3, 16, 16)
    assert torch.equal(small[:4], load_dataset("folder", root / "shadow", None, size=16, cache=False).images[:4])


def test_a_torch_dataset_is_read_lazily_on_request(image_files):
    torchvision = pytest.importorskip("torchvision")
    root, _, owner = image_files
    ds = torchvision.datasets.ImageFolder(str(root / "owner"))
    src = as_images(ds, "owner_images", lazy=True)
    assert isinstance(src, DatasetSource) and src.shape == (N_OWNER, 3, 32, 32)
    assert torch.equal(src.labels, owner.labels) and torch.equal(src[:7], owner.images[:7])
    assert torch.equal(as_images(ds, lazy=True, size=16)[:2], load_dataset("imagefolder", root / "owner", None,
                                                                          size=16, cache=False).images[:2])
    with pytest.raises(ValueError, match="lazy=True"):
        as_images(owner.images, size=16)
    assert as_images(owner.images, lazy=True) is owner.images  # in memory already


def test_protect_on_a_streamed_folder_equals_protect_on_the_tensor(image_files, tmp_path):
    """The same images as files read batch by batch and as tensors: the same trigger, honeypot weights and
    history, bit for bit; the streamed run checkpoints and resumes; nothing ever decoded the whole set."""
    root, shadow, owner = image_files
    torch.manual_seed(0)
    victim = create_model("cnn_small", 10).eval()
    # owner images in the shadows' queries and a simulated thief's fine-tuning exercise every view of the set
    cfg = SPEC(outer_iters=2, shadow_arch="cnn_small", shadow_epochs=1, trigger_passes=1, honeypot_steps=10, seed=2,
               shadow_owner_share=0.5, shadow_finetune_epochs=1, shadow_finetune_images=40)
    ref = protect(victim, shadow, owner.images, cfg, progress=False)
    lazy_shadow = load_dataset("folder", root / "shadow", None, lazy=True)
    lazy_owner = load_dataset("imagefolder", root / "owner", None, lazy=True)
    got = protect(victim, lazy_shadow, lazy_owner, cfg, progress=False, checkpoint_dir=tmp_path)
    assert torch.equal(got.trigger.pattern, ref.trigger.pattern)
    for (name, a), (_, b) in zip(ref.model.state_dict().items(), got.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert got.history == ref.history
    # streamed: every image was read many times, yet never the whole set (shadow + owner) in one request
    for src in (lazy_shadow, lazy_owner):
        assert src.decoded > 2 * len(src) and src.largest_batch <= 500, (src.decoded, src.largest_batch)
    assert lazy_shadow.largest_batch < N_SHADOW + N_OWNER
    # the checkpoint of a streamed run resumes (its key is the hash of the pixels read on the way)
    assert (tmp_path / STATE_FILE).is_file()
    again = protect(victim, lazy_shadow, lazy_owner, cfg, progress=False, checkpoint_dir=tmp_path)
    assert again.history == ref.history and torch.equal(again.trigger.pattern, ref.trigger.pattern)


class Counting(ImageSource):
    """An in-memory set behind the ImageSource interface, counting requests (a stand-in for a huge set)."""

    def __init__(self, images):
        super().__init__()
        self.data = images

    def __len__(self):
        return len(self.data)

    @property
    def item_shape(self):
        return tuple(self.data.shape[1:])

    def load(self, index):
        return self.data[index]


def test_any_image_source_works_and_a_forward_pass_reads_bounded_batches():
    x = torch.randint(0, 256, (1200, 3, 8, 8), dtype=torch.uint8)
    src = Counting(x)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)).eval()
    assert torch.equal(batched_forward(model, src, batch_size=300), batched_forward(model, x, batch_size=300))
    assert src.decoded == 1200 and src.largest_batch == 300
    with pytest.raises(IndexError):
        src[torch.tensor([1200])]
    assert np.array_equal(src[-1].numpy(), x[-1].numpy())
