"""The dashboard a PACS administrator reads, its JSON API, ``/metrics``, ``/healthz``, ``/readyz``
and the mounted DICOMweb sub-application: one aiohttp application."""

from dicom_node.web.data import Sources
from dicom_node.web.metrics import Metrics
from dicom_node.web.middleware import check_exposure
from dicom_node.web.server import WebServer

__all__ = ["Metrics", "Sources", "WebServer", "check_exposure"]
