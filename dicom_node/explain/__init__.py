"""Explanations: the CAM family for every label in one pass (LIME and quality figures follow)."""

from dicom_node.explain.cam import METHODS, CamMaps, CamMethod, GradCAM, GradCAMPlusPlus, HiResCAM

__all__ = ["METHODS", "CamMaps", "CamMethod", "GradCAM", "GradCAMPlusPlus", "HiResCAM"]
