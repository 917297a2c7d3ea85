"""WADO-RS (PS3.18 10.4): studies, series and instances as multipart/related in their stored
transfer syntax, metadata as DICOM JSON with bulk data URIs, frames and rendered previews."""

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Add this service's routes to the DICOMweb sub-application."""
