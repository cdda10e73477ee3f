"""DAMSM recipe comparison on preloaded toy data (not a test).

Trains the toy text and image encoders (no detector: R-precision uses f and s only) with the
DAMSM loss on the train images of a finished toy chain, held in memory without augmentation
besides flips, and prints val R-precision (500 val images, 100 candidates, 5 folds) every 100
steps. The figures behind the toy backbone's max pooling (model/image_encoder.py) and the toy
[encoder] lr / text_dropout (configs/toy.toml) came from:

    .venv/bin/python bench/damsm_recipe.py --artifacts A --pool max --dropout 0.1 --lr 1e-3 --steps 400
    .venv/bin/python bench/damsm_recipe.py --artifacts A --pool avg --dropout 0.1 --lr 1e-3 --steps 400
    .venv/bin/python bench/damsm_recipe.py --artifacts A --pool max --dropout 0.0 --lr 2e-3 --steps 1500

with A an artifacts root after `make demo`'s prep stages (vocab.json, memory.h5, toy-coco/).
"""
import argparse
import time
from pathlib import Path

import torch, torch.nn.functional as F
from cpgan.pipeline.coco import CocoSplit
from cpgan.pipeline.text import Vocabulary
from cpgan.pipeline.memory import load_memory
from cpgan.trainer.data import TextImageDataset
from cpgan.model.image_encoder import ToyBackbone, ObjectAwareImageEncoder
from cpgan.model.text_encoder import MemoryAttendedTextEncoder
from cpgan.model.losses import damsm_loss
from cpgan.model.metrics import r_precision

p = argparse.ArgumentParser()
p.add_argument("--artifacts", type=Path, required=True)
p.add_argument("--pool", default="avg"); p.add_argument("--dropout", type=float, default=0.5)
p.add_argument("--lr", type=float, default=3e-3); p.add_argument("--steps", type=int, default=300)
p.add_argument("--width", type=int, default=16); p.add_argument("--bs", type=int, default=32)
p.add_argument("--sent-only", action="store_true"); p.add_argument("--no-flip", action="store_true")
a = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(0)
root = a.artifacts; vocab = Vocabulary.load(root / "vocab.json")
mem = load_memory(root / "memory.h5", vocab).memory
cache = root / "bench-damsm-cache.pt"  # tensors only, loaded with weights_only
if cache.exists():
    d = torch.load(cache, weights_only=True)
else:
    tr = TextImageDataset(CocoSplit.open(root / "toy-coco", "train2014"), vocab, 18, [64], augment=False, seed=0)
    va = TextImageDataset(CocoSplit.open(root / "toy-coco", "val2014"), vocab, 18, [64], augment=False, seed=0, limit=500)
    def grab(ds):
        imgs = []
        for i in range(len(ds)):
            s = ds[i]; imgs.append(s.images[0])
        return torch.stack(imgs)
    from cpgan.trainer.data import pad_caption
    d = {"train_images": grab(tr), "val_images": grab(va)}
    # all 5 captions of train images
    d["train_caps"] = torch.stack([torch.stack([pad_caption(ids, 18) for _, ids in (c * 5)[:5]]) for c in tr.captions])
    d["train_lens"] = torch.tensor([[len(ids) for _, ids in (c * 5)[:5]] for c in tr.captions])
    vs = [va[i] for i in range(len(va))]
    d["val_caps"] = torch.stack([s.caption for s in vs]); d["val_lens"] = torch.tensor([s.length for s in vs])
    torch.save(d, cache)

class Max(ToyBackbone):
    def forward(self, images):
        x = self.local_net(images)
        pooled = self.global_net(x).amax(dim=(2, 3))
        from cpgan.model.image_encoder import BackboneFeatures, LOCAL_GRID
        return BackboneFeatures(F.adaptive_avg_pool2d(x, LOCAL_GRID), pooled)
class Avg(ToyBackbone):
    def forward(self, images):
        x = self.local_net(images)
        pooled = self.global_net(x).mean(dim=(2, 3))
        from cpgan.model.image_encoder import BackboneFeatures, LOCAL_GRID
        return BackboneFeatures(F.adaptive_avg_pool2d(x, LOCAL_GRID), pooled)
bb = (Max if a.pool == "max" else Avg)(64, a.width)
img = ObjectAwareImageEncoder(bb, 128, None, use_objects=False)
txt = MemoryAttendedTextEncoder(len(vocab), 64, 128, memory=mem, dropout=a.dropout)
opt = torch.optim.Adam([*img.parameters(), *txt.parameters()], lr=a.lr, betas=(0.5, 0.999))
N = d["train_images"].shape[0]; g = torch.Generator().manual_seed(0)
def evaluate():
    img.eval(); txt.eval()
    with torch.no_grad():
        f = img(d["val_images"]).global_feature
        _, s = txt(d["val_caps"], d["val_lens"])
    img.train(); txt.train()
    return r_precision(f, s, candidates=100, folds=5, seed=0)[0]
t0 = time.time(); log = []
for step in range(1, a.steps + 1):
    idx = torch.randint(N, (a.bs,), generator=g)
    which = torch.randint(5, (a.bs,), generator=g)
    x = d["train_images"][idx]
    if not a.no_flip:
        flip = torch.rand(a.bs, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    caps = d["train_caps"][idx, which]; lens = d["train_lens"][idx, which]
    W, s = txt(caps, lens); enc = img(x)
    loss, parts = damsm_loss(W, lens, s, enc.regions, enc.global_feature, 4.0, 5.0, 10.0)
    if a.sent_only: loss = parts["sentence"]
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(txt.parameters(), 0.25); opt.step()
    if step % 100 == 0:
        log.append((step, round(loss.item(), 3), round(evaluate(), 3), round(time.time() - t0)))
        print(vars(a), log[-1], flush=True)
