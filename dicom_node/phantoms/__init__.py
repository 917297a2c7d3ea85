"""Synthetic frontal chest radiographs with findings and exact masks, as DICOM CR and DX.

Seeded and resolution independent: ``render(seed, size)`` gives the same patient and findings at every
size, so a model can train at 256 px while tests check the same cases at 2048 px. ``to_dataset`` and
``write_study`` encode phantoms as CR Image or DX Image (For Presentation) instances.

Brain MR volumes with a tumour-like lesion and its exact masks: ``render_brain`` (needs nilearn, the
``phantoms`` extra) and ``write_brain`` (MR Image series or one Enhanced MR Image instance).
"""

from dicom_node.phantoms.brain import BrainPhantom, render_brain
from dicom_node.phantoms.dataset import MANUFACTURER, phantom_uid, stored_values, to_dataset, write_study
from dicom_node.phantoms.findings import FIELD_MM, LABELS
from dicom_node.phantoms.mr import write_brain
from dicom_node.phantoms.render import PRIOR, Phantom, render

__all__ = [
    "FIELD_MM",
    "LABELS",
    "MANUFACTURER",
    "PRIOR",
    "BrainPhantom",
    "Phantom",
    "phantom_uid",
    "render",
    "render_brain",
    "stored_values",
    "to_dataset",
    "write_brain",
    "write_study",
]
