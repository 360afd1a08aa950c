"""A HOW checkpoint in the authors' layout and their test-time local features, written plainly
from their code (github.com/gtolias/how, MIT): the checkpoint dict of ``how/stages/train.py``
(``net_params`` + ``_version``; its ``scores``, ``Validation.scores``, a ``defaultdict(list)``
holding one ``defaultdict(list)`` per validation; the optimizer's and scheduler's state dicts)
or the first format that ``how/stages/evaluate.py``
``_convert_checkpoint`` reads (``meta`` + a ``whiten`` layer); the network of
``how/networks/how_net.py`` ``init_network`` (torchvision ResNet children without avgpool/fc,
the last ``skip_layer`` dropped); ``HOWNet.features_attentions`` / ``forward_local`` and
``how/layers/functional.py`` ``how_select_local``; images as cirtorch's ``ImagesFromList``
with ``how_net.build_transforms`` reads them. Nothing here comes from gpu_dsm.
"""
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

IMAGENET_MEAN_STD = [[0.485, 0.456, 0.406], [0.229, 0.224, 0.225]]
HOW_SCALES = [2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25]
_OUTPUT_DIM = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048}  # cirtorch imageretrievalnet.OUTPUT_DIM


def _trunk(architecture, skip_layer):
    net = getattr(torchvision.models, architecture)(weights=None)
    children = list(net.children())[:-2]
    return nn.Sequential(*(children[:-skip_layer] if skip_layer else children))


def _validation_scores(epochs):
    """``Validation.scores`` of train.py after ``epochs`` epochs of its default validation
    (``_train_how.yml``: local descriptors on val_eccv20 every 5 epochs, no global validation):
    per epoch the ``train_stats`` (Python floats) and, every 5 epochs, the mAP (a numpy float)."""
    scores = defaultdict(list)
    scores.update({x: defaultdict(list) for x in ("global_descriptor", "local_descriptor")})
    for epoch in range(1, epochs + 1):
        for stat, value in {"train_loss": 0.5 / epoch, "avg_neg_dist": 1.2, "epoch_durations": 3600.0}.items():
            scores[stat].append((epoch, value))
        if epoch % 5 == 0:
            scores["local_descriptor"]["val_eccv20"].append((epoch, np.float64(0.5 + 0.01 * epoch)))
    return scores


def write_checkpoint(path, architecture="resnet18", skip_layer=0, dim=128, seed=0, first_format=False, epochs=0):
    """A random-weight HOW checkpoint with the authors' key names and meta; BatchNorm statistics
    and affine parameters are randomised too, so every weight matters. ``epochs``: 0 writes what
    train.py saves before training (``model_epoch0.pth``), more the checkpoint of that epoch (an
    Adam step taken, validation scores and the best score filled in)."""
    torch.manual_seed(seed)
    features = _trunk(architecture, skip_layer)
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    backbone_dim = _OUTPUT_DIM[architecture] // (2 ** skip_layer)
    reduction = nn.Conv2d(backbone_dim, dim, (1, 1), padding=0, bias=True)
    mean, std = IMAGENET_MEAN_STD
    if first_format:
        state = {f"features.{k}": v for k, v in features.state_dict().items()}
        state["whiten.weight"], state["whiten.bias"] = reduction.weight.data, reduction.bias.data
        meta = {"architecture": architecture, "skip_layer": skip_layer, "dim": dim, "feat_pool_k": 3, "mean": mean, "std": std}
        torch.save({"epoch": 20, "meta": meta, "state_dict": state}, path)
        return path
    optimizer = torch.optim.Adam(reduction.parameters(), lr=1e-6, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)
    if epochs:  # one step (zero gradients, weight decay): the optimizer holds its state
        for p in reduction.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        scheduler.step()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["dim_reduction.weight"], state["dim_reduction.bias"] = reduction.weight.data, reduction.bias.data
    net_params = {"architecture": architecture, "pretrained": True, "skip_layer": skip_layer,
                  "dim_reduction": {"dim": dim}, "smoothing": {"kernel_size": 3},
                  "runtime": {"mean_std": IMAGENET_MEAN_STD, "image_size": 1024, "features_num": 1000,
                              "scales": HOW_SCALES, "training_scales": [1]}}
    meta = {"architecture": architecture, "backbone_dim": backbone_dim, "outputdim": dim, "corercf_size": 32 // (2 ** skip_layer)}
    scores = _validation_scores(epochs)
    decisive = scores["local_descriptor"].get("val_eccv20")
    best = (max(decisive, key=lambda x: float(x[1])) if decisive else min(scores["train_loss"], key=lambda x: float(x[1])))[1] \
        if epochs else None
    if epochs == 0:
        ckpt = {"epoch": 0, "meta": meta, "state_dict": state, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "best_score": best, "scores": scores, "net_params": net_params,
                "_version": "how/2020"}
    else:
        ckpt = {"epoch": epochs, "meta": meta, "state_dict": state, "optimizer": optimizer.state_dict(),
                "best_score": best, "scores": scores, "net_params": net_params, "_version": "how/2020"}
    torch.save(ckpt, path)
    return path


class Network:
    """The authors' HOWNet at test time, built from a checkpoint file."""

    def __init__(self, path):
        state = torch.load(path, map_location="cpu", weights_only=False)  # the authors' torch.load: a full unpickle
        if "_version" not in state:  # _convert_checkpoint
            meta = state["meta"]
            state["net_params"] = {"architecture": meta["architecture"], "skip_layer": meta["skip_layer"],
                                   "dim_reduction": {"dim": meta["dim"]}, "smoothing": {"kernel_size": meta["feat_pool_k"]},
                                   "runtime": {"mean_std": [meta["mean"], meta["std"]]}}
            sd = state["state_dict"]
            sd["dim_reduction.weight"], sd["dim_reduction.bias"] = sd.pop("whiten.weight"), sd.pop("whiten.bias")
        params, sd = state["net_params"], state["state_dict"]
        self.features = _trunk(params["architecture"], params["skip_layer"]).eval()
        self.features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")})
        self.weight, self.bias = sd["dim_reduction.weight"], sd["dim_reduction.bias"]
        self.kernel = params["smoothing"]["kernel_size"]
        self.mean, self.std = params["runtime"]["mean_std"]

    def load_image(self, path, imsize):
        """``(1, 3, H, W)``: RGB, ``thumbnail((imsize, imsize))`` with Lanczos, ToTensor, Normalize."""
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        img.thumbnail((imsize, imsize), Image.LANCZOS)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(self.mean)[:, None, None], torch.tensor(self.std)[:, None, None]
        return ((x - mean) / std)[None]

    @torch.no_grad()
    def forward_local(self, x, features_num, scales):
        """``(descriptors (n, d), attentions (n,), locations (n, 2) x then y, scales (n,))``, best first."""
        feats, masks = [], []
        for s in scales:
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False, recompute_scale_factor=True)
            o = self.features(xs)
            masks.append((o.pow(2.0).sum(1) + 1e-10).sqrt().squeeze(0))  # L2Attention, on the raw map
            o = F.avg_pool2d(o, (self.kernel, self.kernel), stride=1, padding=self.kernel // 2, count_include_pad=False)
            feats.append(F.conv2d(o, self.weight, self.bias))  # ConvDimReduction
        mx = max(m.max() for m in masks)
        masks = [m / mx for m in masks]
        desc, atts, locs, scls = [], [], [], []
        for sc, vs, ms in zip(scales, feats, masks):
            height, width = ms.shape
            desc.append(vs.squeeze(0).reshape(vs.shape[1], -1).T)
            atts.append(ms.reshape(-1))
            locs.append(torch.stack([torch.arange(width).repeat(height),
                                     torch.arange(height).view(-1, 1).repeat(1, width).reshape(-1)], 1))
            scls.append(torch.full((height * width,), sc))
        desc, atts, locs, scls = torch.cat(desc), torch.cat(atts), torch.cat(locs), torch.cat(scls)
        idx = atts.sort(descending=True)[1][:min(features_num, atts.shape[0])]
        return desc[idx], atts[idx], locs[idx], scls[idx]
