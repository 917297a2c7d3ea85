"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, matched by
:mod:`dicom_node.query.match` (the C-FIND's matching), answered as DICOM JSON."""

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Add this service's routes to the DICOMweb sub-application."""
