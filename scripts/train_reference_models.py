#!/usr/bin/env python
"""Train the two reference models and write them as complete model packages.

    .venv/bin/pip install -r requirements-train.txt      # torch==2.13.0 (CPU build)
    .venv/bin/python scripts/train_reference_models.py   # both models, ~20 min on 2 threads

Run by hand, never from ``make test``.  Everything is seeded (torch, numpy, data order,
augmentation), single-process and deterministic on CPU, so a rerun on the same machine and
library versions gives the same weights.

Per model: an ensemble of small CNNs (two architectures × seeds) trained on the training split
with augmentation, AdamW and a cosine schedule; the validation split is used only to fit one
temperature, choose the operating point and report metrics (there is no test split here).  The
members are exported as ONE ONNX graph (opset 17, dynamic batch) with outputs ``probs``
(averaged member probabilities), ``cam`` (averaged class activation maps) and ``embedding``
(concatenated pooled features, for the out-of-distribution gate).  Then the package files are
written (manifest, card, calibration, golden, OOD statistics) and the model is quantized to
INT8 with ``appliance.analyze.quantize.quantize_model``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.analyze.quantize import (  # noqa: E402
    _session, preprocess_source_images, quantize_model, refresh_file_hashes, run_model,
)
from appliance.analyze.validate import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci, roc_auc  # noqa: E402

MEAN, STD = 0.5, 0.5  # normalisation (x/255 - MEAN) / STD, same in the manifest


# --------------------------------------------------------------------------- configuration

@dataclass
class Spec:
    model_id: str
    data_file: str
    positive_labels: list[int]          # source labels meaning "finding present"
    finding_code: str
    finding_label: str
    severity: str
    target_sensitivity: float
    hflip: bool                         # horizontal flips anatomically acceptable?
    max_rotation: float                 # degrees
    epochs: int
    members: list[tuple[str, int]]      # (architecture, seed)
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    tta_hflip: bool = False             # average each member over the image and its mirror


SPECS = {
    "cxr-pneumonia": Spec(
        model_id="cxr-pneumonia", data_file="pneumoniamnist_trainval.npz", positive_labels=[1],
        finding_code="pneumonia", finding_label="Pneumonia suspected", severity="urgent",
        target_sensitivity=0.95, hflip=False, max_rotation=10.0, epochs=30,
        members=[("plain", 1), ("res", 2), ("plain", 3), ("res", 4)], batch_size=128,
    ),
    "us-breast-lesion": Spec(
        model_id="us-breast-lesion", data_file="breastmnist_trainval.npz", positive_labels=[0],
        finding_code="suspicious_malignancy", finding_label="Lesion suspicious for malignancy",
        severity="review", target_sensitivity=0.90, hflip=True, max_rotation=15.0, epochs=60,
        members=[("plain", 11), ("res", 12), ("plain", 13), ("res", 14)], batch_size=64,
    ),
}


# --------------------------------------------------------------------------- networks

def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
                     if cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.skip(x))


class Member(nn.Module):
    """28×28 → 7×7×C features → global average pool → dropout → linear logit."""

    def __init__(self, arch: str, widths: tuple[int, int, int] = (16, 32, 64), dropout: float = 0.3):
        super().__init__()
        stages = []
        cin = 1
        for i, w in enumerate(widths):
            if arch == "plain":
                block: nn.Module = nn.Sequential(_conv_bn(cin, w), _conv_bn(w, w))
            elif arch == "res":
                block = _ResBlock(cin, w)
            else:
                raise ValueError(arch)
            stages.append(block)
            if i < len(widths) - 1:
                stages.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*stages)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, 1)
        self.dim = cin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.fc(self.drop(f.mean(dim=(2, 3)))).squeeze(1), f


class Ensemble(nn.Module):
    """The exported graph: averaged probabilities, averaged CAM, concatenated embedding."""

    def __init__(self, members: list[Member], temperature: float, tta_hflip: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.inv_t = 1.0 / float(temperature)
        self.tta_hflip = tta_hflip

    def forward(self, image: torch.Tensor):  # type: ignore[override]
        probs, cams, embs = [], [], []
        size = None
        for m in self.members:
            f = m.features(image)
            if self.tta_hflip:
                # mirrored pass, mapped back so the CAM stays registered to the input
                f = 0.5 * (f + torch.flip(m.features(torch.flip(image, dims=[3])), dims=[3]))
            pooled = f.mean(dim=(2, 3))
            logit = m.fc(pooled)
            probs.append(torch.sigmoid(logit * self.inv_t))
            # CAM: classifier weights applied to every spatial position of the last features
            cam = F.relu(F.conv2d(f, m.fc.weight.view(1, -1, 1, 1)))
            if size is None:
                size = cam.shape[-2:]
            elif cam.shape[-2:] != size:
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
            cams.append(cam)
            embs.append(pooled)
        n = float(len(self.members))
        prob = probs[0]
        cam = cams[0]
        for p, c in zip(probs[1:], cams[1:]):
            prob = prob + p
            cam = cam + c
        return prob / n, cam / n, torch.cat(embs, dim=1)


# --------------------------------------------------------------------------- training

def _augment(x: torch.Tensor, spec: Spec, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(spec.max_rotation)
    scale = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * 0.10
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2.5 / 14.0)  # about ±2.5 pixels
    flip = torch.ones(n)
    if spec.hflip:
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # mild intensity jitter in [0, 1] space: contrast, brightness, gamma
    x01 = (x * STD + MEAN).clamp(0, 1)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.15)
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.15
    bright = (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * 0.06
    x01 = ((x01 ** gamma - 0.5) * contrast + 0.5 + bright).clamp(0, 1)
    return (x01 - MEAN) / STD


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255.0 - MEAN) / STD).unsqueeze(1)


@torch.no_grad()
def _member_logits(m: Member, x: torch.Tensor, tta_hflip: bool = False) -> np.ndarray:
    m.eval()
    out = []
    for i in range(0, len(x), 512):
        f = m.features(x[i:i + 512])
        if tta_hflip:
            f = 0.5 * (f + torch.flip(m.features(torch.flip(x[i:i + 512], dims=[3])), dims=[3]))
        out.append(m.fc(f.mean(dim=(2, 3))).squeeze(1))
    return torch.cat(out).numpy()


def train_member(arch: str, seed: int, spec: Spec, xtr: torch.Tensor, ytr: torch.Tensor,
                 xva: torch.Tensor, yva: np.ndarray, epochs: int, cache_dir: Path | None = None) -> Member:
    cached = None
    if cache_dir is not None:
        cached = cache_dir / f"{spec.model_id}-{arch}-{seed}-{epochs}ep-{spec.lr}-{spec.batch_size}.pt"
        if cached.is_file():
            m = Member(arch)
            m.load_state_dict(torch.load(cached))
            print(f"    {arch}/{seed}: loaded {cached}", flush=True)
            return m.eval()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    m = Member(arch)
    opt = torch.optim.AdamW(m.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / spec.batch_size)
    total = epochs * steps_per_epoch
    warm = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    t0 = time.time()
    for ep in range(epochs):
        m.train()
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), spec.batch_size):
            idx = perm[i:i + spec.batch_size]
            if len(idx) < 2:
                continue
            xb = _augment(xtr[idx], spec, gen)
            yb = ytr[idx]
            # light label smoothing: the labels of 28×28 thumbnails are not perfectly separable
            target = yb * 0.96 + 0.02
            loss = F.binary_cross_entropy_with_logits(m(xb)[0], target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if ep == epochs - 1 or (ep + 1) % max(1, epochs // 4) == 0:
            auc = roc_auc(yva, _member_logits(m, xva))
            print(f"    {arch}/{seed} epoch {ep + 1}/{epochs} loss {loss.item():.3f} "
                  f"val AUC {auc:.4f} ({time.time() - t0:.0f}s)", flush=True)
    m.eval()
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(m.state_dict(), cached)
    return m


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """One temperature shared by all members, minimising the NLL of the averaged probability."""
    best_t, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(np.log(0.5), np.log(4.0), 61)):
        p = (1.0 / (1.0 + np.exp(-logits / t))).mean(axis=0).clip(1e-6, 1 - 1e-6)
        nll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def operating_point(y: np.ndarray, p: np.ndarray, target_sens: float) -> tuple[float, float, float]:
    """Highest threshold (rounded down to 1e-6) whose validation sensitivity is ≥ target."""
    pos = np.sort(p[y == 1])
    k = int(math.floor((1.0 - target_sens) * len(pos) + 1e-9))  # positives we may miss
    thr = math.floor(float(pos[k]) * 1e6) / 1e6
    sens = float(np.mean(p[y == 1] >= thr))
    spec = float(np.mean(p[y == 0] < thr))
    return thr, sens, spec


# --------------------------------------------------------------------------- OOD statistics

def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean and precision of ``x`` with Ledoit-Wolf shrinkage towards a scaled identity."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    mean = x.mean(axis=0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta = np.sum((s - mu * np.eye(d)) ** 2) / d
    # sum_i ||x_i x_i^T - S||_F^2 == sum_i ||x_i||^4 - n ||S||_F^2  (since sum_i x_i x_i^T = n S)
    beta_sum = float(np.sum(np.sum(xc ** 2, axis=1) ** 2) - n * np.sum(s ** 2))
    beta = min(beta_sum / n ** 2 / d, delta)
    shrink = beta / delta if delta > 0 else 1.0
    cov = shrink * mu * np.eye(d) + (1 - shrink) * s
    return mean, np.linalg.inv(cov), float(shrink)


def mahalanobis(e: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = np.asarray(e, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


# --------------------------------------------------------------------------- package writing

def export_onnx(ens: Ensemble, path: Path) -> None:
    ens.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        ens, (dummy,), str(path), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["probs", "cam", "embedding"],
        dynamic_axes={"image": {0: "N"}, "probs": {0: "N"}, "cam": {0: "N"}, "embedding": {0: "N"}},
        do_constant_folding=True,
    )
    import onnx  # strip the doc strings that embed local paths, keep the file reproducible
    model = onnx.load(str(path))
    model.producer_name = "scripts/train_reference_models.py"
    for node in model.graph.node:
        node.doc_string = ""
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _fmt(x: float, nd: int = 4) -> str:
    return f"{x:.{nd}f}"


MANIFEST_TEMPLATES = {
    "cxr-pneumonia": dict(
        name="Pneumonia triage (chest radiograph)",
        intended_use=("Triage aid: flags frontal (PA/AP) chest radiographs that may show pneumonia so "
                      "that a clinician reads them first. Trained on paediatric chest X-rays at 28x28 "
                      "pixels. Not a diagnosis; every flagged and unflagged image still needs a "
                      "clinician's read."),
        training_data="PneumoniaMNIST (MedMNIST v2, CC BY 4.0), from Kermany et al., Cell 2018",
        applicability="""modalities = ["CR", "DX"]
body_parts = ["CHEST", ""]
views = ["PA", "AP", ""]
photometric = ["MONOCHROME1", "MONOCHROME2"]
min_rows = 256
min_columns = 256
colour = "reject"
# Kermany et al. 2018: paediatric patients aged 1-5 years, Guangzhou Women and Children's
# Medical Center; both sexes. Ages in completed years, bounds inclusive.
population = "children aged 1–5 years"
min_age_years = 1
max_age_years = 5
unknown_age = "abstain"         # most chest films are of adults: an unknown age is most likely outside""",
    ),
    "us-breast-lesion": dict(
        name="Breast lesion triage (ultrasound)",
        intended_use=("Triage aid: flags breast ultrasound images whose lesion looks suspicious for "
                      "malignancy so that they are reviewed by a specialist first. Trained on 28x28 "
                      "thumbnails of the BUSI data set. Not a diagnosis; it does not replace BI-RADS "
                      "assessment or biopsy decisions."),
        training_data="BreastMNIST (MedMNIST v2, CC BY 4.0), from Al-Dhabyani et al., Data in Brief 2020 (BUSI)",
        applicability="""modalities = ["US"]
body_parts = []
views = []
photometric = []
min_rows = 64
min_columns = 64
colour = "to_grey"
# BUSI (Al-Dhabyani et al. 2020): 600 women aged 25-75 years, Baheya Hospital, Cairo.
population = "women aged 25–75 years"
min_age_years = 25
max_age_years = 75
unknown_age = "analyse"         # breast ultrasound patients are mostly adult women; the result says the age was unknown
sexes = ["F"]
unknown_sex = "analyse"         # likewise, with a note""",
    ),
}


def write_manifest(pkg: Path, spec: Spec, r: dict) -> None:
    t = MANIFEST_TEMPLATES[spec.model_id]
    text = f"""# Written by scripts/train_reference_models.py ({r['date']}); [files] refreshed by quantize.
[model]
id = "{spec.model_id}"
version = "1.0.0"
name = "{t['name']}"
task = "classification"
intended_use = "{t['intended_use']}"
training_data = "{t['training_data']}"
disclaimer = "AI assist — not a diagnosis. NOT FOR CLINICAL USE."

[applicability]                 # metadata and population gate; empty list = any
{t['applicability']}

[input]
name = "image"
shape = [1, 1, 28, 28]          # N is dynamic in the ONNX graph; 1 here
dtype = "float32"
layout = "NCHW"

[[preprocess]]
op = "center_crop_square"
[[preprocess]]
op = "resize"
size = [28, 28]
interpolation = "area"
[[preprocess]]
op = "normalize"
scale = 255.0
mean = {MEAN}
std = {STD}

[[outputs]]
name = "probs"                  # (N, 1)
activation = "sigmoid_applied"
[[outputs]]
name = "cam"                    # (N, 1, 7, 7) class activation map, >= 0
kind = "heatmap"
[[outputs]]
name = "embedding"              # (N, {r['emb_dim']}) pooled features for the OOD gate
kind = "embedding"

[[findings]]
index = 0
code = "{spec.finding_code}"
label = "{spec.finding_label}"
severity = "{spec.severity}"
threshold = {r['threshold']}
sensitivity = {_fmt(r['sens'])}
specificity = {_fmt(r['spec'])}

[ood]
method = "mahalanobis"          # sqrt((e - mean)^T precision (e - mean)) on `embedding`
stats = "ood.npz"
threshold = {_fmt(r['ood_threshold'])}
percentile = 99.5

[data]                          # where the validation split lives (under ../shared/data)
file = "{spec.data_file}"
positive_labels = {json.dumps(spec.positive_labels)}   # source labels meaning "finding present"

[validation]                    # FP32 model on the validation split (no test split available)
n = {r['n_val']}
n_positive = {r['n_val_pos']}
auc = {_fmt(r['auc'])}
auc_ci95 = [{_fmt(r['auc_ci'][0])}, {_fmt(r['auc_ci'][1])}]
"""
    (pkg / "manifest.toml").write_text(text, encoding="utf-8")


def write_card(pkg: Path, spec: Spec, r: dict, q: dict | None) -> None:
    is_cxr = spec.model_id == "cxr-pneumonia"
    members = ", ".join(f"{a} (seed {s})" for a, s in spec.members)
    int8 = ("not yet quantized" if q is None else
            f"{_fmt(q['int8_auc'])} (95% CI {_fmt(q['int8_auc_ci'][0])}–{_fmt(q['int8_auc_ci'][1])}); "
            f"drop vs FP32 {q['drop']:+.4f} (refused above 0.01)")
    member_rows = "\n".join(f"| {a} seed {s} | {_fmt(auc)} |" for (a, s), auc in zip(spec.members, r['member_aucs']))
    if is_cxr:
        data = """**PneumoniaMNIST** (MedMNIST v2; Yang et al., Scientific Data 2023; licence CC BY 4.0), derived
from the paediatric chest X-ray collection of Kermany et al., Cell 2018 (Guangzhou Women and
Children's Medical Center; children aged 1–5). Frontal chest radiographs, centre-cropped and
resized to 28×28 grey. Labels: 0 = normal, 1 = pneumonia (bacterial and viral together). Splits
used: the de-duplicated training split (4,682 images: 1,213 normal / 3,469 pneumonia) and the
validation split (524: 135 / 389) from `../shared/data/pneumoniamnist_trainval.npz`. The official
test split was not available and was not used."""
        limits = """- **Paediatric only.** Trained on children aged 1–5 from one hospital; behaviour on adult
  radiographs, other hospitals and other X-ray equipment is unknown.
- **28×28 resolution.** The whole radiograph is reduced to 784 pixels; small consolidations,
  line/tube position, effusions and anything that needs detail are invisible to it.
- **One finding.** It does not detect tuberculosis, pneumothorax, masses, fractures or any other
  finding; "not flagged" does not mean "normal".
- **Validation only.** Operating point and all numbers come from the validation split, which was
  also used to fit the temperature, so they are somewhat optimistic. The test distribution of
  PneumoniaMNIST is known to differ from its validation split; expect lower AUC on new sites.
- Pneumonia is the majority class in training (74%); predicted probabilities reflect that
  prevalence, not a clinic's."""
        severity_note = "Severity **urgent**: a flagged film is moved to the top of the worklist."
    else:
        data = """**BreastMNIST** (MedMNIST v2; Yang et al., Scientific Data 2023; licence CC BY 4.0), derived
from the Breast Ultrasound Images data set (BUSI; Al-Dhabyani et al., Data in Brief 2020; 600
women aged 25–75, Baheya Hospital, Cairo, LOGIQ E9 scanners). Images resized to 28×28 grey.
BreastMNIST label 0 = malignant, 1 = normal or benign; this model's finding
"suspicious_malignancy" = 1 − label. Splits used: training 546 (147 malignant / 399
normal-or-benign) and validation 78 (21 / 57) from `../shared/data/breastmnist_trainval.npz`.
The official test split was not available and was not used."""
        limits = """- **Tiny data.** 546 training and 78 validation images (21 malignant): the validation AUC
  has a wide confidence interval and the operating point rests on 21 positive cases.
- **One scanner family, one hospital** (BUSI); other probes, presets and populations are
  untested. The original BUSI images contain annotations/markers that may leak into 28×28.
- **28×28 resolution.** Margins, calcifications and posterior features that BI-RADS relies on are
  mostly lost; it is a coarse triage signal only.
- Input should be a still frame showing the lesion; it was not trained on arbitrary clip frames.
- **Validation only**; temperature and threshold were fitted on the same validation split."""
        severity_note = ("Severity **review** (not urgent): a suspicious breast lesion needs a "
                         "specialist read and usually a biopsy within days, not minutes, and at a "
                         "clinic's lower prevalence most flags will be false positives; raising it to *urgent* "
                         "would crowd the worklist ahead of genuinely time-critical cases.")

    text = f"""# Model card: {MANIFEST_TEMPLATES[spec.model_id]['name']} (`{spec.model_id}` 1.0.0)

> **NOT FOR CLINICAL USE.** Reference model for demonstrating and testing the appliance.
> Its output is **AI assist — not a diagnosis**; a clinician decides.

## Intended use
{MANIFEST_TEMPLATES[spec.model_id]['intended_use']}
{severity_note}

## Data (provenance and licence)
{data}

## Training recipe
- Script: `scripts/train_reference_models.py` (PyTorch {torch.__version__} CPU, 2 threads,
  fixed seeds; run {r['date']}; wall time {r['train_seconds'] / 60:.1f} min for this model).
- Input: 1×28×28, `x/255`, then `(x − {MEAN}) / {STD}` (manifest `[[preprocess]]`).
- Ensemble of {len(spec.members)} small CNNs inside one ONNX graph: {members}. "plain" =
  3 stages of two 3×3 conv+BN+ReLU (16/32/64 channels, max-pool between stages); "res" = 3
  residual stages (16/32/64). Each: global average pool → dropout 0.3 → linear logit.
- Augmentation: random rotation ±{spec.max_rotation:.0f}°, scale ±10%, shift ±2.5 px,
  {"horizontal flip (probe orientation is arbitrary)" if spec.hflip else "no flips (chest anatomy is not left-right symmetric)"},
  mild gamma/contrast/brightness jitter.
{"- Test-time augmentation inside the graph: each member averages its last features over the image and its mirror image (mapped back), so `probs`, `cam` and `embedding` are flip-averaged." + chr(10) if spec.tta_hflip else ""}- AdamW (lr {spec.lr}, weight decay {spec.weight_decay}), batch {spec.batch_size},
  {spec.epochs} epochs, one warm-up epoch then cosine decay, BCE with label smoothing 0.02.
  The last epoch is kept (no early stopping on validation).
- Output: mean of the members' sigmoid(logit / T), one temperature T = {r['temperature']:.3f}
  fitted on validation (NLL). `cam` = mean over members of ReLU(classifier weights · last 7×7
  features); `embedding` = members' pooled features concatenated ({r['emb_dim']}-D).

## Validation results (validation split, n = {r['n_val']}, {r['n_val_pos']} with the finding)
| model | AUC |
| --- | --- |
{member_rows}
| **ensemble, FP32** | **{_fmt(r['auc'])}** (95% CI {_fmt(r['auc_ci'][0])}–{_fmt(r['auc_ci'][1])}) |
| ensemble, INT8 (QDQ) | {int8} |

95% CIs: percentile bootstrap over cases, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}
(`appliance.analyze.validate.bootstrap_ci`, the same computation `appliance models validate` prints).
For reference, published 28×28 results on the *test* split (MedMNIST v2):
{"ResNet-18 0.944, ResNet-50 0.948, Google AutoML Vision 0.991" if is_cxr else "ResNet-18 0.901, Google AutoML Vision 0.919"}.
Validation and test numbers are not directly comparable.

## Operating point
Threshold **{r['threshold']}** on `probs`, chosen on validation as the highest threshold with
sensitivity ≥ {spec.target_sensitivity:.2f}: sensitivity **{_fmt(r['sens'], 3)}**, specificity
**{_fmt(r['spec'], 3)}** (validation). Sites should re-check it on their own images with
`appliance models validate` before relying on it.

## Out-of-distribution gate
Mahalanobis distance `sqrt((e − mean)ᵀ P (e − mean))` of `embedding` to the training
embeddings (Ledoit-Wolf shrinkage {r['shrinkage']:.3f}); images above {_fmt(r['ood_threshold'], 2)}
(99.5th percentile of training+validation distances) are abstained on.

## Limitations
{limits}
- Output is a probability-like score, calibrated on a small validation split only.
- The class activation map is 7×7, coarse, and shows where the features that raised the score
  were; it is not a segmentation.
"""
    (pkg / "MODEL_CARD.md").write_text(text, encoding="utf-8")


def build_package(spec: Spec, data_dir: Path, engines_dir: Path, epochs: int | None,
                  quantize: bool, cache_dir: Path | None = None) -> dict:
    t_start = time.time()
    npz = np.load(data_dir / spec.data_file)
    tr_img, va_img = npz["train_images"], npz["val_images"]
    ytr = np.isin(npz["train_labels"].ravel(), spec.positive_labels).astype(np.float32)
    yva = np.isin(npz["val_labels"].ravel(), spec.positive_labels).astype(np.int64)
    xtr, xva = _to_tensor(tr_img), _to_tensor(va_img)
    ep = epochs or spec.epochs
    print(f"== {spec.model_id}: train {len(ytr)} ({int(ytr.sum())} pos), val {len(yva)} "
          f"({int(yva.sum())} pos), {ep} epochs × {len(spec.members)} members", flush=True)

    members, member_logits = [], []
    for arch, seed in spec.members:
        m = train_member(arch, seed, spec, xtr, torch.from_numpy(ytr), xva, yva, ep, cache_dir)
        members.append(m)
        member_logits.append(_member_logits(m, xva, spec.tta_hflip))
    logits = np.stack(member_logits)
    member_aucs = [roc_auc(yva, lg) for lg in logits]
    temperature = fit_temperature(logits, yva)
    train_seconds = time.time() - t_start

    pkg = engines_dir / spec.model_id
    pkg.mkdir(parents=True, exist_ok=True)
    for stale in ("model.int8.onnx",):
        if (pkg / stale).exists():
            (pkg / stale).unlink()
    ens = Ensemble(members, temperature, spec.tta_hflip).eval()
    export_onnx(ens, pkg / "model.onnx")

    # everything below uses the exported graph through ONNX Runtime, as the box will
    steps = [{"op": "center_crop_square"}, {"op": "resize", "size": [28, 28], "interpolation": "area"},
             {"op": "normalize", "scale": 255.0, "mean": MEAN, "std": STD}]
    as_manifest = {"input": {"shape": [1, 1, 28, 28]}, "preprocess": steps}
    sess = _session(pkg / "model.onnx")
    va_x = preprocess_source_images(va_img, as_manifest)
    tr_x = preprocess_source_images(tr_img, as_manifest)
    out_va = run_model(sess, "image", va_x)
    out_tr = run_model(sess, "image", tr_x)
    with torch.no_grad():
        ref = ens(torch.from_numpy(va_x[:16]))
    for name, t in zip(("probs", "cam", "embedding"), ref):
        err = float(np.abs(out_va[name][:16] - t.numpy()).max())
        assert err < 1e-4, f"ONNX export mismatch on {name}: {err}"

    p = out_va["probs"][:, 0]
    auc = roc_auc(yva, p)
    auc_ci = bootstrap_ci(yva, p)
    thr, sens, spc = operating_point(yva, p, spec.target_sensitivity)

    mean, precision, shrink = ledoit_wolf(out_tr["embedding"])
    dists = np.r_[mahalanobis(out_tr["embedding"], mean, precision),
                  mahalanobis(out_va["embedding"], mean, precision)]
    ood_thr = float(np.percentile(dists, 99.5))
    np.savez(pkg / "ood.npz", mean=mean.astype(np.float32), precision=precision.astype(np.float32))

    rng = np.random.default_rng(1234)
    calib_idx = np.sort(np.r_[
        rng.choice(np.flatnonzero(ytr == 1), 64, replace=False),
        rng.choice(np.flatnonzero(ytr == 0), 64, replace=False)])
    np.savez_compressed(pkg / "calibration.npz", images=tr_img[calib_idx],
                        labels=ytr[calib_idx].astype(np.uint8))
    gold_idx = np.sort(np.r_[rng.choice(np.flatnonzero(yva == 1), 4, replace=False),
                             rng.choice(np.flatnonzero(yva == 0), 4, replace=False)])
    gold_in = va_x[gold_idx]
    gold = run_model(sess, "image", gold_in)
    np.savez(pkg / "golden.npz", inputs=gold_in, **gold)

    r = dict(date=_dt.date.today().isoformat(), emb_dim=int(out_va["embedding"].shape[1]),
             threshold=thr, sens=sens, spec=spc, ood_threshold=ood_thr, n_val=int(len(yva)),
             n_val_pos=int(yva.sum()), auc=auc, auc_ci=auc_ci, member_aucs=member_aucs,
             temperature=temperature, train_seconds=train_seconds, shrinkage=shrink)
    write_manifest(pkg, spec, r)
    write_card(pkg, spec, r, None)
    refresh_file_hashes(pkg)
    q = None
    if quantize:
        q = quantize_model(pkg, data_dir)
        write_card(pkg, spec, r, q)
        refresh_file_hashes(pkg)
    print(f"== {spec.model_id}: val AUC {auc:.4f} [{auc_ci[0]:.4f}, {auc_ci[1]:.4f}] members "
          f"{[round(a, 4) for a in member_aucs]} T={temperature:.3f} thr={thr} sens={sens:.3f} "
          f"spec={spc:.3f} ood_thr={ood_thr:.2f}"
          + (f" INT8 AUC {q['int8_auc']:.4f} (drop {q['drop']:+.4f})" if q else "")
          + f" [{(time.time() - t_start) / 60:.1f} min]", flush=True)
    return {**r, "int8": q}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=sorted(SPECS), default=sorted(SPECS))
    ap.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--engines-dir", type=Path, default=ROOT / "engines")
    ap.add_argument("--epochs", type=int, default=None, help="override (smoke tests only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-quantize", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="keep/reuse trained member weights here (outside git), e.g. /tmp/refmodels")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    np.random.seed(0)
    t0 = time.time()
    for mid in args.models:
        build_package(SPECS[mid], args.data_dir, args.engines_dir, args.epochs, not args.no_quantize,
                      args.cache_dir)
    print(f"total {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
