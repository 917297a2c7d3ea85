"""Back to the PACS: the outbox of results and the exporter that delivers them by C-STORE."""

from dicom_node.export.outbox import DeliveryState, Outbox, OutboxError, OutboxRecord, Result
from dicom_node.export.sender import DestinationWorker, Exporter, Outcome, classify

__all__ = [
    "DeliveryState", "DestinationWorker", "Exporter", "Outbox", "OutboxError", "OutboxRecord", "Outcome",
    "Result", "classify",
]
