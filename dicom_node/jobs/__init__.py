"""Durable jobs: series completeness, routing to pipelines, the queue and its workers."""

from dicom_node.jobs.queue import Job, JobError, JobQueue, JobSpec, JobState, QueuePolicy

__all__ = ["Job", "JobError", "JobQueue", "JobSpec", "JobState", "QueuePolicy"]
