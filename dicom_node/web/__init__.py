"""The dashboard a PACS administrator reads, its JSON API, ``/metrics``, ``/healthz`` and ``/readyz``."""

from dicom_node.web.data import Sources
from dicom_node.web.metrics import Metrics
from dicom_node.web.server import WebServer, check_exposure

__all__ = ["Metrics", "Sources", "WebServer", "check_exposure"]
