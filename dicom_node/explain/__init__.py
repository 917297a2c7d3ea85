"""Explanations: the CAM family for every label in one pass, batched LIME, quality figures."""

from dicom_node.explain.cam import CAM, METHODS, CamMaps, CamMethod, GradCAM, GradCAMPlusPlus, HiResCAM
from dicom_node.explain.lime import LimeResult, lime, slic

__all__ = ["CAM", "METHODS", "CamMaps", "CamMethod", "GradCAM", "GradCAMPlusPlus", "HiResCAM", "LimeResult",
           "lime", "slic"]
