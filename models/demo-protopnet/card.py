"""The manifest and model card of the demo prototype network, from the figures its scripts measured."""

import json

from dicom_node.explain.prototypes import PrototypeIdentity
from dicom_node.phantoms import LABELS

CODES = {  # SNOMED CT concepts for the findings (as models/demo-cxr)
    "nodule": ("SCT", "27925004", "Nodule"),
    "consolidation": ("SCT", "95436008", "Lung consolidation"),
    "effusion": ("SCT", "60046008", "Pleural effusion"),
    "cardiomegaly": ("SCT", "8186001", "Cardiomegaly"),
}
FOCAL = ("nodule", "consolidation")


def manifest(size: int, sha256: str, version: str) -> str:
    labels = "".join(
        f'\n[[labels]]\nname = "{label}"\nthreshold = 0.5\ncode = {json.dumps(list(CODES[label]))}\n'
        for label in LABELS
    )
    return (
        f'name = "demo-protopnet"\nversion = "{version}"\narchitecture = "protopnet"\n'
        f'weights = "weights.pt"\nsha256 = "{sha256}"\ncam_layer = "features.relu4"\n'
        'intended_use = "Research demo trained on synthetic phantoms, not for clinical use."\n\n'
        f'[input]\nsize = {size}\nchannels = 1\nnormalization = "zero_one"\nmultiframe = "middle"\n\n'
        '[scope]\nmodalities = ["CR", "DX"]\nbody_parts = ["CHEST"]\n' + labels
    )


def _accuracy(metrics: dict) -> str:
    held = metrics["held_out"]
    rows = "\n".join(
        f"| {label} | {held['protopnet'][label]:.4f} | {held['demo-cxr'][label]:.4f} | "
        f"{held['protopnet'][label] - held['demo-cxr'][label]:+.4f} | {held['positives'][label]} |"
        for label in LABELS)
    return ("| label | AUC, this model | AUC, demo-cxr 3.0.0 | difference | positives |\n"
            "| --- | --- | --- | --- | --- |\n" + rows)


def _localisation(metrics: dict) -> str:
    rows = []
    for label, r in metrics.get("localisation", {}).items():
        if not r["findings"]:
            continue
        rows.append(f"| {label}{' (focal)' if label in FOCAL else ''} | {r['findings']} | {r['hit']:.3f} | "
                    f"{r['hit_centre']:.3f} | {r['hit_area']:.3f} | {r['iou']:.3f} | {r['iou_centre']:.3f} | "
                    f"{r['iou_area']:.3f} | {r['top_shows_finding']:.2f} |")
    return ("| finding | findings | pointing game | centre map | area baseline | IoU | IoU centre map | "
            "IoU area baseline | top prototype's patch shows a finding |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))


def _focal(metrics: dict) -> str:
    focal = metrics.get("localisation_focal")
    if not focal:
        return ""
    met = "meets" if focal["hit"] >= 0.8 else "misses"
    alone = ", ".join(f"{label} alone {metrics['localisation'][label]['hit']:.3f}" for label in FOCAL)
    return (f"Focal findings (nodules and consolidations) together: the top prototype's map hits the "
            f"mask in {focal['hit']:.3f} of {focal['findings']} findings ({met} the target of 0.80 only "
            f"pooled: {alone}; see Limits).")


def _split(metrics: dict) -> str:
    split = metrics.get("logit_split")
    if not split:
        return "not measured"
    rows = split["rows"]
    own = [r["own"] for r in rows if r["shown"] and r["logit"] > 0]
    other = [r["other"] for r in rows]
    return (f"measured by `evaluate.py` on held-out seeds {', '.join(map(str, split['seeds']))}, the "
            f"other labels' prototypes add {min(other):+.1f} to {max(other):+.1f} to every logit "
            f"({len(other)} logits), while on the {len(own)} positive logits the label's own prototypes "
            f"add {min(own):+.1f} to {max(own):+.1f} (connections to other labels' prototypes: "
            f"{split['other_weight_min']:.2f} to {split['other_weight_max']:.2f}, mean "
            f"{split['other_weight_mean']:.2f})")


def _limits(metrics: dict) -> str:
    """What the figures above do not show, from ``metrics.json``."""
    loc, held, t = metrics.get("localisation", {}), metrics["held_out"], metrics["training"]
    if not loc:
        return ""
    nod, con, eff, card = (loc[label] for label in LABELS)
    lowest = min(min(held[m].values()) for m in ("protopnet", "demo-cxr"))
    return f"""## Limits

- **Nodules alone miss the localisation target.** The top nodule prototype's map hits the nodule
  in {nod['hit']:.3f} of {nod['findings']} findings (< 0.80); the 0.80 target is met only pooled with
  consolidations ({con['hit']:.3f}, large masks that are easy to hit).
- **Cardiomegaly and effusion are not localised better than trivial maps.** Cardiomegaly's
  pointing game is {card['hit']:.3f} against {card['hit_centre']:.3f} for a map peaking at the image
  centre, and its IoU {card['iou']:.3f} against {card['iou_centre']:.3f} for that centre map:
  the centre map is better. Effusion's pointing game is {eff['hit']:.3f}.
- **"Patch shows a finding" is 1.00 for nodules and consolidations by construction.** The push
  only allowed cells on the finding's mask for these labels (the fine annotation of IAIA-BL:
  training used the finding masks), so every such prototype overlaps a finding whatever the model
  learnt. The figure says something only for effusion and cardiomegaly.
- **"Shows the finding" is lenient.** It means that the prototype's 26 px receptive field (on
  the {t['size']} px input) overlaps the label's mask by at least one pixel. The SC draws that
  patch at the image's height, about {t['size'] / 26:.1f}x larger than the matched region boxed on
  the image.
- **The AUC comparison says little.** Both models' held-out AUCs are at least {lowest:.3f}:
  on these phantoms, being within 0.03 of demo-cxr's AUCs tells little about the model.
- **The held-out seeds were seen during development.** The held-out phantoms (seeds from
  1,000,000) were measured with the first recipe, and its held-out nodule AUC of 0.460 is what
  led to the mask-restricted cluster cost and push (see "What was tried first"). They are not an
  untouched test set for the recipe that shipped.
- **The explanation shows one side of a difference of large numbers.** The last layer's
  connections to other labels' prototypes stayed near their initial -0.5 (the L1 of 1e-4 barely
  moved them): {_split(metrics)}. The explanation shows the own label's prototypes only, so it
  leaves out a negative term about as large as what it shows. Chen et al. fix this with a strong
  L1 on the off-class connections in the last-layer stage, driving them to 0; not done yet.
"""
def _before_push(metrics: dict) -> str:
    before = metrics["held_out"].get("protopnet_before_push")
    if not before:
        return ""
    return ("AUCs before the push (after the joint stage, prototypes not yet patches): "
            + ", ".join(f"{label} {before[label]:.4f}" for label in LABELS) + ".")


def _prototypes(identities: list[PrototypeIdentity]) -> str:
    rows = "\n".join(
        f"| {p.prototype} | {p.label} | {p.seed} | {p.render_size} | {', '.join(map(str, p.box_source))} | "
        f"{', '.join(map(str, p.box_model))} | {'yes' if p.shows_finding else '**no**'} |" for p in identities)
    return ("| prototype | label | training phantom seed | rendered at (px) | patch box on the phantom "
            "(x0, y0, x1, y1) | on the 128 px input | patch overlaps the finding's mask |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n" + rows)


def model_card(metrics: dict, identities: list[PrototypeIdentity]) -> str:
    """MODEL_CARD.md from ``metrics.json`` and the prototypes' identities (nothing typed in by hand)."""
    t = metrics["training"]
    blind = [p for p in identities if not p.shows_finding]
    blind_text = ", ".join(f"{p.prototype} ({p.label})" for p in blind) or "none"
    return f"""# Model card: demo-protopnet {metrics['version']}

**Research demo trained on synthetic phantoms, not for clinical use.** It has never seen a real
radiograph. It exists so that prototype explanations ("this looks like that") can be measured
against known ground truth.

| | |
| --- | --- |
| Architecture | `protopnet` (`dicom_node.inference.protopnet.ProtoPNet`): the conv blocks of `compact_cnn` (8/16/32/64 channels, batch norm, ReLU, 2x2 max-pooling after the first two; a 32 x 32 grid at 128 px, each cell seeing a 26 px patch), add-on 1x1 layers (64 -> 32 -> 32, ReLU, sigmoid), 5 prototypes of shape (32, 1, 1) per label (20), similarity log((d² + 1) / (d² + 1e-4)) max-pooled over the grid, a 20 -> 4 linear layer (class connection) |
| Input | {t['size']} x {t['size']}, 1 channel, values in [0, 1] after the file's VOI window (the node's preprocessing, letterboxed) |
| Outputs | 4 independent logits (sigmoid): nodule, consolidation, effusion, cardiomegaly; threshold 0.5 each |
| Prototypes | `prototypes.json`: each prototype's training phantom (seed, render size), patch box and label |
| CAM layer | `features.relu4` |
| Weights | `weights.pt`, sha256 `{metrics['sha256']}` |
| Scope | CR and DX, chest, frontal |

## Training data

{t['phantoms']} phantoms from `dicom_node.phantoms` (seeds {t['seed']} to {t['seed'] + t['phantoms'] - 1}), the
same as demo-cxr's: rendered at {', '.join(map(str, t['render_sizes_train']))} px, written as DICOM CR or DX
(12, 14 or 16 bits stored; 30 % MONOCHROME1) and read back through the node's preprocessing. Unlike
demo-cxr, no perturbed (half-blurred) images.

## Training (ProtoPNet's stages, Chen et al. 2019, for multi-label outputs)

1. **Joint** ({t['epochs']} epochs, batch {t['batch']}, AdamW lr 3e-3 with a one-cycle schedule, weight decay
   1e-4; every parameter, the class connection starting at 1 to a prototype's own label and -0.5
   elsewhere): binary cross-entropy + 0.8 x cluster cost (for each label the image shows, the least
   squared distance of one of its prototypes to a patch of the image; for nodules and
   consolidations, to a patch whose 4 x 4 px grid cell touches the finding's mask, the fine
   annotation of IAIA-BL, Barnett et al. 2021) - 0.08 x separation cost (the least distance for
   each label the image does not show, over the whole image) + 1e-4 x L1 of the connections to
   other labels' prototypes. The backbone is not pretrained, so there is no warm-up stage with a
   frozen backbone.
   Loss per epoch: {', '.join(f'{v:.3f}' for v in metrics['losses'])}.
2. **Push**: each prototype is replaced by the feature of the training patch nearest to it among the
   training images that show its label (for the focal findings, among the cells on the finding's
   mask, as in the cluster cost); each prototype *is* that patch (the tests re-render it from
   the seed and check the feature equals the prototype within 1e-5).
3. **Last layer** ({t['last_steps']} full-batch Adam steps, lr 1e-2, on the pushed similarities; BCE +
   1e-4 x L1 of the connections to other labels' prototypes): loss {metrics['last_layer_loss'][0]:.4f} ->
   {metrics['last_layer_loss'][-1]:.4f}.

Seed {t['seed']}, {t['threads']} CPU threads, {t['minutes']} minutes in all (data, stages and the held-out
AUCs of both models), `nice -n 10` on a shared 2-core VM ({t['machine']}), Python {t['python']},
torch {t['torch']}. Seeded throughout; a tiny run gives the same weights bytes twice (tested), and a second full run (2026-12-02, 11 minutes) wrote the same weights and prototypes.json.

## Held-out accuracy

{t['held_out']} phantoms never used in training (seeds from 1,000,000, rendered at
{', '.join(map(str, t['render_sizes_held_out']))} px), the same images for both models:

{_accuracy(metrics)}

{_before_push(metrics)}

**What was tried first.** The same recipe with the cluster cost and the push over the whole image
for every label (3000 phantoms, 10 epochs; 23.6 minutes under a load average of 6-7) reached
held-out AUCs of 0.460 (nodule), 0.978 (consolidation), 0.9999 (effusion) and 0.9999
(cardiomegaly): all five nodule prototypes had settled on patches common to every chest (none
overlapped a nodule), and the push made the nodule output meaningless (last-layer loss 2.12
after the push). Tying the focal findings' cluster cost and push to the cells on their masks is
what changed.

## Localisation (evaluate.py)

{metrics.get('localisation_held_out', 0)} held-out phantoms (the same seeds); for each finding a phantom
shows, the top prototype of that label (largest similarity x class connection), its similarity map
upsampled to the model's input grid (bilinear), mapped to the 1024 px source image through the
letterbox, minus its minimum, against the finding's exact mask: pointing game (the map's maximum
inside the mask) and IoU (the map at half its peak), with the centre-map and area baselines of
`dicom_node.explain.quality.localisation`. Effusion masks are the fluid; cardiomegaly's is the heart.

{_localisation(metrics)}

{_focal(metrics)}

{_limits(metrics)}
## Prototypes

Prototypes whose patch does not overlap their label's finding mask: {blind_text}. Such a prototype
stands for context (a position, the anatomy around a finding) rather than the finding itself; an
explanation that shows it says so through the patch it displays.

{_prototypes(identities)}

## Reproduce

```sh
nice -n 10 .venv/bin/python models/demo-protopnet/train.py
nice -n 10 .venv/bin/python models/demo-protopnet/evaluate.py
```

The first writes `weights.pt`, `prototypes.json` and `metrics.json`; the second `model.toml`, the
localisation figures, the logit split of the Limits and this card (`evaluate.py --card-only`
keeps the localisation figures and rewrites the card in seconds). torch's CPU kernels may differ in the last bits between
machines, so the sha256 may differ elsewhere.
"""
