"""dicom-node: an explainable-AI DICOM node."""

import uuid

from pydicom.uid import UID

__version__ = "0.1.0"

#: Implementation Class UID (PS3.7 D.3.3.2) of this software, a 2.25 UID from a fixed UUID.
IMPLEMENTATION_CLASS_UID = UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:dicom-node:implementation').int}")
#: Implementation Version Name, at most 16 characters.
IMPLEMENTATION_VERSION_NAME = f"DICOM_NODE_{__version__.replace('.', '')}"[:16]
#: Manufacturer of every object the node creates; series carrying it are never routed again.
MANUFACTURER = "dicom-node"
