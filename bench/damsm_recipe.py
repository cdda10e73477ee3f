"""DAMSM recipe comparison on preloaded toy data (not a test).

Trains the toy text and image encoders (no detector: R-precision uses f and s only) with the
DAMSM loss on the train images of a finished toy chain, held in memory at 64 px, and prints
val R-precision (500 val images, 100 candidates, 5 folds) every ``--every`` steps, with the
same figure on 500 train images beside it (underfitting or overfitting). Augmentation: random
flips, and with ``--crop`` an approximation of AttnGAN's crop (the 64 px image enlarged to
76 px and cropped back to 64). Every figure quoted in the code came from one of:

    B=".venv/bin/python bench/damsm_recipe.py --artifacts A"
    # toy backbone's max pooling (model/image_encoder.py ToyBackbone)
    $B --backbone toy --pool max --sentence last --dropout 0.1 --lr 1e-3 --steps 400
    $B --backbone toy --pool avg --sentence last --dropout 0.1 --lr 1e-3 --steps 400
    # starting from the classifier (ClassifierBackbone), s max-pooled (text_encoder.py)
    $B --backbone classifier --sentence max --sent-only --steps 500
    $B --backbone classifier-frozen --sentence max --sent-only --steps 500
    $B --backbone toy --sentence max --sent-only --steps 500
    $B --backbone classifier --sentence last --sent-only --steps 500
    # AttnGAN's crop against flips only (configs/toy.toml random_crop), full DAMSM loss
    $B --backbone classifier --sentence max --steps 500
    $B --backbone classifier --sentence max --steps 500 --crop

with A an artifacts root after `make demo`'s prep stages and ``fit-classifier`` (vocab.json,
memory.h5, toy-coco/, models/classifier.pt). One thread; the first run caches the decoded
images in ``A/bench-damsm-cache.pt`` (tensors only, read back with ``weights_only``).
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cpgan.model.image_encoder import (LOCAL_GRID, BackboneFeatures, ClassifierBackbone,
                                       ObjectAwareImageEncoder, ToyBackbone)
from cpgan.model.losses import damsm_loss
from cpgan.model.metrics import r_precision
from cpgan.model.text_encoder import MemoryAttendedTextEncoder
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.memory import load_memory
from cpgan.pipeline.text import Vocabulary
from cpgan.trainer.classifier import load_classifier
from cpgan.trainer.data import TextImageDataset, pad_caption

SIZE, WORDS, EMBED, DIM, EVAL_IMAGES = 64, 18, 64, 128, 500


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, required=True)
    p.add_argument("--backbone", choices=["toy", "classifier", "classifier-frozen"],
                   default="classifier")
    p.add_argument("--pool", choices=["max", "avg"], default="max", help="toy backbone only")
    p.add_argument("--width", type=int, default=16, help="toy backbone only")
    p.add_argument("--sentence", choices=["last", "max"], default="max")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--sent-only", action="store_true", help="sentence loss L^s only")
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--crop", action="store_true", help="AttnGAN's 76/64 random crop")
    return p.parse_args()


def cached_data(root: Path, vocab: Vocabulary) -> dict[str, torch.Tensor]:
    """Decoded train images with all 5 captions, and 500 val images with their fixed caption."""
    cache = root / "bench-damsm-cache.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    coco = root / "toy-coco"
    train = TextImageDataset(CocoSplit.open(coco, "train2014"), vocab, WORDS, [SIZE],
                             augment=False, seed=0)
    val = TextImageDataset(CocoSplit.open(coco, "val2014"), vocab, WORDS, [SIZE],
                           augment=False, seed=0, limit=EVAL_IMAGES)
    data = {"train_images": torch.stack([train[i].images[0] for i in range(len(train))])}
    five = [(c * 5)[:5] for c in train.captions]
    data["train_caps"] = torch.stack([torch.stack([pad_caption(ids, WORDS) for _, ids in c])
                                      for c in five])
    data["train_lens"] = torch.tensor([[len(ids) for _, ids in c] for c in five])
    samples = [val[i] for i in range(len(val))]
    data["val_images"] = torch.stack([s.images[0] for s in samples])
    data["val_caps"] = torch.stack([s.caption for s in samples])
    data["val_lens"] = torch.tensor([s.length for s in samples])
    torch.save(data, cache)
    return data


class AvgToyBackbone(ToyBackbone):
    """The toy backbone with Inception's average pool in place of its max pool."""

    def forward(self, images):
        x = self.local_net(images)
        return BackboneFeatures(F.adaptive_avg_pool2d(x, LOCAL_GRID),
                                self.global_net(x).mean(dim=(2, 3)))


def backbone(a: argparse.Namespace):
    if a.backbone == "toy":
        return (ToyBackbone if a.pool == "max" else AvgToyBackbone)(SIZE, a.width)
    classifier = load_classifier(a.artifacts / "models" / "classifier.pt", image_size=SIZE)
    net = ClassifierBackbone(classifier.width, SIZE)
    net.start_from(classifier)
    if a.backbone == "classifier-frozen":
        net.frozen = True
        net.requires_grad_(False)
    return net


def crop_like_attngan(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    big = F.interpolate(x, size=(76, 76), mode="bilinear", align_corners=False)
    offsets = torch.randint(76 - SIZE + 1, (x.shape[0], 2), generator=g)
    return torch.stack([big[i, :, oy:oy + SIZE, ox:ox + SIZE]
                        for i, (oy, ox) in enumerate(offsets.tolist())])


def main() -> None:
    a = arguments()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vocab = Vocabulary.load(a.artifacts / "vocab.json")
    memory = load_memory(a.artifacts / "memory.h5", vocab).memory
    d = cached_data(a.artifacts, vocab)
    img = ObjectAwareImageEncoder(backbone(a), DIM, None, use_objects=False)
    txt = MemoryAttendedTextEncoder(len(vocab), EMBED, DIM, memory=memory, dropout=a.dropout,
                                    sentence=a.sentence)
    params = [p for p in [*img.parameters(), *txt.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr, betas=(0.5, 0.999))
    n, g = d["train_images"].shape[0], torch.Generator().manual_seed(0)

    @torch.no_grad()
    def r_prec(images, caps, lens) -> float:
        img.eval(); txt.eval()
        f = img(images).global_feature
        _, s = txt(caps, lens)
        img.train(); txt.train()
        return round(r_precision(f, s, candidates=100, folds=5, seed=0)[0], 3)

    start = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(n, (a.bs,), generator=g)
        which = torch.randint(5, (a.bs,), generator=g)
        x = d["train_images"][idx]
        if a.crop:
            x = crop_like_attngan(x, g)
        if not a.no_flip:
            flip = torch.rand(a.bs, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        caps, lens = d["train_caps"][idx, which], d["train_lens"][idx, which]
        words, sentence = txt(caps, lens)
        enc = img(x)
        loss, parts = damsm_loss(words, lens, sentence, enc.regions, enc.global_feature,
                                 4.0, 5.0, 10.0)
        if a.sent_only:
            loss = parts["sentence"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(txt.parameters(), 0.25)
        opt.step()
        if step % a.every == 0:
            first = torch.arange(EVAL_IMAGES)
            val = r_prec(d["val_images"], d["val_caps"], d["val_lens"])
            train = r_prec(d["train_images"][first], d["train_caps"][first, 0],
                           d["train_lens"][first, 0])
            print(f"step {step}: loss {loss.item():.3f}, val R-prec {val}, train R-prec "
                  f"{train}, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
