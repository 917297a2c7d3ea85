"""Retention: how long inputs and results are kept, and what goes when the disk fills.

``rules`` decides what may go (read-only), ``purge`` deletes it so that a kill leaves nothing
dangling, ``disk`` holds the high-water and stop marks, ``service`` runs the policy in the node
and for ``dicom-node purge``.
"""

from dicom_node.retention.disk import DiskMarks, DiskUsage, read_usage, store_floor, used_percent
from dicom_node.retention.purge import PURGED, Outcome, Purger
from dicom_node.retention.rules import Candidate, Kept, Kind, Planner
from dicom_node.retention.service import Plan, Retention

__all__ = [
    "PURGED", "Candidate", "DiskMarks", "DiskUsage", "Kept", "Kind", "Outcome", "Plan", "Planner", "Purger",
    "Retention", "read_usage", "store_floor", "used_percent",
]
