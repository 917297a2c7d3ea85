"""Scale-out: the compute-heavy steps of a job on Ray actors, the node staying the DICOM endpoint.

Ray is an optional extra (``pip install .[ray]``): nothing here imports it until
``[workers] executor = "ray"`` starts a :class:`~dicom_node.scaleout.executor.RayExecutor`.
"""

from dicom_node.scaleout.actor import ComputeActor, Computed
from dicom_node.scaleout.executor import ActorStatus, ClusterUnavailable, RayExecutor

__all__ = ["ActorStatus", "ClusterUnavailable", "ComputeActor", "Computed", "RayExecutor"]
