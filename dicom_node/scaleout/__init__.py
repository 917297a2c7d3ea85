"""Scale-out: the compute-heavy steps of a job on Ray actors, the node staying the DICOM endpoint.

Ray is an optional extra (``pip install .[ray]``), and the node process never imports it: with
``[workers] executor = "ray"`` a :class:`~dicom_node.scaleout.executor.RayExecutor` runs the Ray
driver in a child process (:mod:`dicom_node.scaleout.driver`), the only one that imports Ray.
"""

from dicom_node.scaleout.actor import ComputeActor, Computed
from dicom_node.scaleout.executor import ActorStatus, ClusterUnavailable, RayExecutor

__all__ = ["ActorStatus", "ClusterUnavailable", "ComputeActor", "Computed", "RayExecutor"]
